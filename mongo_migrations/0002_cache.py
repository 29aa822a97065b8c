"""cache: a unique key and a TTL index on the expiry field."""

from pymongo import ASCENDING
from pymongo.database import Database

dependencies = ["0001_chunks"]


def upgrade(db: Database) -> None:
    db.cache.create_index([("key", ASCENDING)], unique=True, name="key")
    # expireAfterSeconds=0: each document expires at the time in its own expires_at.
    db.cache.create_index([("expires_at", ASCENDING)], expireAfterSeconds=0, name="expires_at_ttl")


def downgrade(db: Database) -> None:
    db.cache.drop_index("expires_at_ttl")
    db.cache.drop_index("key")
