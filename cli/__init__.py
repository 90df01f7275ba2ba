"""The click CLI ``invsync``: thin, talks to the daemon's control API only."""
