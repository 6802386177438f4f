"""``python -m lrpcli``: the command line, also what ``torchrun ... -m lrpcli explain`` starts on every rank."""

from lrpcli.cli import main

if __name__ == "__main__":
    main(prog_name="lrpcli")
