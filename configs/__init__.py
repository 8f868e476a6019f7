"""Bundled configs: YAML diffs over the defaults in spp_detect/config.py (`-c NAME` finds them)."""
