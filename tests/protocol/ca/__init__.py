"""Channel Access front-end tests: pyepics (libca) and caproto clients against in-process servers."""
