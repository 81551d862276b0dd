"""The `fedcrm` command line."""
