"""`python -m saga_es` is the `saga-es` command."""

from saga_es.cli import main

main()
