"""Judging and reporting: judges (built-in, user code, reward models), the policy evaluation, the
comparison report and its plots, and what a training path cost."""
