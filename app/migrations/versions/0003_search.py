"""full-text search over conversation titles and message content

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 10:00:00

SQLite: `search_doc` holds one row per searchable text (a conversation's title, or a finished message's content),
kept in sync with `conversation` and `message` by triggers, and the FTS5 table `search_fts` indexes it as its
external content. The documents have an INTEGER PRIMARY KEY so the FTS rowids stay stable (VACUUM may renumber
the implicit rowids of the UUID-keyed tables). A later migration that rebuilds `conversation` or `message` with
batch_alter_table drops their triggers and must create them again.

PostgreSQL: GIN indexes over `to_tsvector('english', ...)` of the title and the content; the queries use the very
same expressions, so the planner uses the indexes.
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

SQLITE_UPGRADE = [
    """
    CREATE TABLE search_doc (
        id INTEGER PRIMARY KEY,
        conversation_id BLOB NOT NULL,
        message_id BLOB,
        body TEXT NOT NULL
    )
    """,
    "CREATE INDEX ix_search_doc_conversation_id ON search_doc (conversation_id)",
    "CREATE UNIQUE INDEX ix_search_doc_message_id ON search_doc (message_id)",
    """
    CREATE VIRTUAL TABLE search_fts USING fts5(
        body, content='search_doc', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2'
    )
    """,
    # the documents -> the FTS index (the external-content pattern of the FTS5 manual)
    """
    CREATE TRIGGER search_doc_ai AFTER INSERT ON search_doc BEGIN
        INSERT INTO search_fts (rowid, body) VALUES (new.id, new.body);
    END
    """,
    """
    CREATE TRIGGER search_doc_ad AFTER DELETE ON search_doc BEGIN
        INSERT INTO search_fts (search_fts, rowid, body) VALUES ('delete', old.id, old.body);
    END
    """,
    """
    CREATE TRIGGER search_doc_au AFTER UPDATE ON search_doc BEGIN
        INSERT INTO search_fts (search_fts, rowid, body) VALUES ('delete', old.id, old.body);
        INSERT INTO search_fts (rowid, body) VALUES (new.id, new.body);
    END
    """,
    # conversations -> title documents (message_id NULL)
    """
    CREATE TRIGGER conversation_search_ai AFTER INSERT ON conversation BEGIN
        INSERT INTO search_doc (conversation_id, message_id, body) VALUES (new.id, NULL, new.title);
    END
    """,
    """
    CREATE TRIGGER conversation_search_au AFTER UPDATE OF title ON conversation BEGIN
        UPDATE search_doc SET body = new.title WHERE conversation_id = new.id AND message_id IS NULL;
    END
    """,
    """
    CREATE TRIGGER conversation_search_ad AFTER DELETE ON conversation BEGIN
        DELETE FROM search_doc WHERE conversation_id = old.id;
    END
    """,
    # messages -> content documents, once a message is no longer streaming (a reply is indexed when it ends)
    """
    CREATE TRIGGER message_search_ai AFTER INSERT ON message WHEN new.status != 'streaming' BEGIN
        INSERT INTO search_doc (conversation_id, message_id, body) VALUES (new.conversation_id, new.id, new.content);
    END
    """,
    """
    CREATE TRIGGER message_search_au AFTER UPDATE OF content, status ON message WHEN new.status != 'streaming' BEGIN
        DELETE FROM search_doc WHERE message_id = old.id;
        INSERT INTO search_doc (conversation_id, message_id, body) VALUES (new.conversation_id, new.id, new.content);
    END
    """,
    """
    CREATE TRIGGER message_search_ad AFTER DELETE ON message BEGIN
        DELETE FROM search_doc WHERE message_id = old.id;
    END
    """,
    # what is there already
    "INSERT INTO search_doc (conversation_id, message_id, body) SELECT id, NULL, title FROM conversation",
    """
    INSERT INTO search_doc (conversation_id, message_id, body)
    SELECT conversation_id, id, content FROM message WHERE status != 'streaming'
    """,
]

SQLITE_DOWNGRADE = [
    "DROP TRIGGER IF EXISTS message_search_ad",
    "DROP TRIGGER IF EXISTS message_search_au",
    "DROP TRIGGER IF EXISTS message_search_ai",
    "DROP TRIGGER IF EXISTS conversation_search_ad",
    "DROP TRIGGER IF EXISTS conversation_search_au",
    "DROP TRIGGER IF EXISTS conversation_search_ai",
    "DROP TRIGGER IF EXISTS search_doc_au",
    "DROP TRIGGER IF EXISTS search_doc_ad",
    "DROP TRIGGER IF EXISTS search_doc_ai",
    "DROP TABLE IF EXISTS search_fts",
    "DROP TABLE IF EXISTS search_doc",
]

POSTGRES_UPGRADE = [
    "CREATE INDEX ix_message_content_fts ON message USING gin (to_tsvector('english', content))",
    "CREATE INDEX ix_conversation_title_fts ON conversation USING gin (to_tsvector('english', title))",
]

POSTGRES_DOWNGRADE = [
    "DROP INDEX IF EXISTS ix_conversation_title_fts",
    "DROP INDEX IF EXISTS ix_message_content_fts",
]


def _run(statements: list[str]) -> None:
    for statement in statements:
        op.execute(statement)


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        _run(SQLITE_UPGRADE)
    elif dialect == "postgresql":
        _run(POSTGRES_UPGRADE)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        _run(SQLITE_DOWNGRADE)
    elif dialect == "postgresql":
        _run(POSTGRES_DOWNGRADE)
