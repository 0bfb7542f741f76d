"""Object stores: adapters and base models live in a local folder or an S3 bucket (`store.Store`,
`open_store(uri)`), with their settings (`settings`, from LORAFLEET_S3_* variables) and the mirroring
of a base model's files to local disk (`models.fetch_model`).

May import: the minio client and the standard library. Never torch, Redis, serve/ or cli/.
"""
