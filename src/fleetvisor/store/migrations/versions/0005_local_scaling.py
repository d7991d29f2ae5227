"""local scaling: an instance's scaling policy and service endpoint, a sibling's parent

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scaling_policy", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("parent_id", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("endpoint", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_instances_parent_id", ["parent_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_index("ix_instances_parent_id")
        batch_op.drop_column("endpoint")
        batch_op.drop_column("parent_id")
        batch_op.drop_column("scaling_policy")
