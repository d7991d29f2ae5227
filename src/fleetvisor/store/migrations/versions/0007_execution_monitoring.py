"""execution monitoring: an instance's health policy, its remedy history, its host labels

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("health_policy", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("remedies", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("required_labels", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("required_labels")
        batch_op.drop_column("remedies")
        batch_op.drop_column("health_policy")
