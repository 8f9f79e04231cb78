"""Data as the stages read it: sources (files, hub, demo), tokenisation and packing, preference pairs and
their import, and collect-prefs' labels and labelling screen."""
