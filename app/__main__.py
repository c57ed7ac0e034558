"""`python -m app` is `meshctl`."""

from app.cli import main

main()
