"""``python -m qshift.cli``: the same as the ``qshift`` command."""
from qshift.cli import main

main()
