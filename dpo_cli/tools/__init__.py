"""Commands around finished (or stopped) runs rather than stages: export, generate and chat, runs."""
