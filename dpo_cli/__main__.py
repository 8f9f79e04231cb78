"""The entry point of `python -m dpo_cli` and of the `dpo-cli` script."""

from dpo_cli.core.signals import hold_warning_signal

hold_warning_signal()  # before the heavy imports below: a SIGUSR1 while they run must not kill the process

from dpo_cli.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
