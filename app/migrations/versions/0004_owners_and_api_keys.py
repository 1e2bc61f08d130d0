"""owners and their API keys

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 12:00:00

Every conversation gets an owner; those stored before belong to the local owner (`local`), whom every request acts
for while authentication is off. `api_key` holds the SHA-256 of each key, never the key.

SQLite: the column and the index are added in place (ALTER TABLE), not with batch_alter_table, which would rebuild
`conversation` and drop the search triggers of migration 0003.
"""

from __future__ import annotations

import sqlalchemy as sa
from advanced_alchemy.types import GUID, DateTimeUTC
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_key",
        sa.Column("id", GUID(length=16), nullable=False),
        sa.Column("owner", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=True),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("revoked_at", DateTimeUTC(timezone=True), nullable=True),
        sa.Column("sa_orm_sentinel", sa.Integer(), nullable=True),
        sa.Column("created_at", DateTimeUTC(timezone=True), nullable=False),
        sa.Column("updated_at", DateTimeUTC(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_key")),
    )
    op.create_index(op.f("ix_api_key_key_hash"), "api_key", ["key_hash"], unique=True)
    op.create_index(op.f("ix_api_key_owner"), "api_key", ["owner"], unique=False)
    op.add_column("conversation", sa.Column("owner", sa.String(length=64), server_default="local", nullable=False))
    op.create_index("ix_conversation_owner_updated_at", "conversation", ["owner", "updated_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_conversation_owner_updated_at", table_name="conversation")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("ALTER TABLE conversation DROP COLUMN owner")  # SQLite 3.35+, in place: the triggers stay
    else:
        op.drop_column("conversation", "owner")
    op.drop_index(op.f("ix_api_key_owner"), table_name="api_key")
    op.drop_index(op.f("ix_api_key_key_hash"), table_name="api_key")
    op.drop_table("api_key")
