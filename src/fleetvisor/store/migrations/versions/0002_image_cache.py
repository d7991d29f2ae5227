"""image cache: host cache reports, pinned images, resolved image digests

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cache_pins",
        sa.Column("image", sa.String(length=255), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("image"),
    )
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("cache", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_digest", sa.String(length=71), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("image_digest")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("cache")
    op.drop_table("cache_pins")
