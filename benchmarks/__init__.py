"""Measurements that print numbers: the feature-cache benchmark and the leave-one-domain-out sweep."""
