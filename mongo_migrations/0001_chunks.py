"""chunks: lookup indexes and a $jsonSchema validator."""

from pymongo import ASCENDING
from pymongo.database import Database

dependencies: list[str] = []

VALIDATOR = {
    "$jsonSchema": {
        "bsonType": "object",
        "required": ["video_id", "sequence", "start_seconds", "end_seconds"],
        "properties": {
            "video_id": {"bsonType": ["int", "long"], "description": "videos.id in the same environment"},
            "sequence": {"bsonType": ["int", "long"], "minimum": 0},
            "start_seconds": {"bsonType": ["double", "int", "long"], "minimum": 0},
            "end_seconds": {"bsonType": ["double", "int", "long"], "minimum": 0},
            "text": {"bsonType": "string"},
            "created_at": {"bsonType": "date"},
        },
    }
}


def upgrade(db: Database) -> None:
    # moderate: documents written before the validator existed are not rejected on update.
    if "chunks" in db.list_collection_names():
        db.command("collMod", "chunks", validator=VALIDATOR, validationLevel="moderate")
    else:
        db.create_collection("chunks", validator=VALIDATOR, validationLevel="moderate")
    # Lookups by video use the prefix of the unique (video_id, sequence) index.
    db.chunks.create_index([("video_id", ASCENDING), ("sequence", ASCENDING)], unique=True,
                           name="video_id_sequence")
    db.chunks.create_index([("created_at", ASCENDING)], name="created_at")


def downgrade(db: Database) -> None:
    db.chunks.drop_index("created_at")
    db.chunks.drop_index("video_id_sequence")
    db.command("collMod", "chunks", validator={}, validationLevel="off")
