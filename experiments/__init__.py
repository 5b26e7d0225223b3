"""One-off investigations, kept runnable for the record (``python -m experiments.<name>``); see README.md here."""
