"""A site's gate: what a site installs to decide which app runs on its data (fedclip-clientapp, fedclip-approve).

It lives outside the app it checks: the FAB (pyproject's fab-include) holds server_app/, client_app/, common/ and conf/,
so the hash a site approves does not change when the gate does, and the gate imports nothing of the app it checks.
"""
