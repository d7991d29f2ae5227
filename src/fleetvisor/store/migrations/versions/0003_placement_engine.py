"""placement engine: host utilization samples, instance usage and placement
explanations, placement group generations

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "host_samples",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("host_id", sa.String(length=32), nullable=False),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("cpu", sa.Float(), nullable=False),
        sa.Column("memory", sa.Float(), nullable=False),
        sa.Column("net", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("host_samples", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_host_samples_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_host_samples_host_id"), ["host_id"], unique=False)
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("last_sample_at", sa.Float(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(sa.Column("usage", sa.JSON(), nullable=False, server_default="{}"))
        batch_op.add_column(sa.Column("placement", sa.JSON(), nullable=False, server_default="{}"))
    with op.batch_alter_table("placement_groups", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("generation", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("placement_groups", schema=None) as batch_op:
        batch_op.drop_column("generation")
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("placement")
        batch_op.drop_column("usage")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("last_sample_at")
    op.drop_table("host_samples")
