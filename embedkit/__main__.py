"""`python -m embedkit ...`: the same CLI as the `embedkit` script."""

from embedkit.cli import main

main()
