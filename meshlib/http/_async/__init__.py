"""The async HTTP driver, written once: the sync twin in ``meshlib/http/_sync/`` is generated
from these modules by ``scripts/unasync.py`` (edit here, then run it)."""
