"""The local Minerva: a stand-in for the real service, on 127.0.0.1, for trying and testing.

`minerva_mount.local.server.serve(state_dir, credential_lifetime, api_port)` runs it:
SeaweedFS (`weed mini`) as the S3 server and STS (`seaweed`), the `POST /storage/boto`
credential endpoint (`endpoint`), and persistent keys in the state directory (`state`).
"""
