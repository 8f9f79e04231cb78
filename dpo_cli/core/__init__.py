"""The ground everything stands on: recipe schemas and loading, run directories, the process a stage runs in
(device, precision, signals, collectives, Slurm), the terminal, errors and the user-code rule."""
