"""attestation: host attestation state, TPM enrolments, published releases, trusted-host instances

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "host_enrolments",
        sa.Column("host_name", sa.String(length=63), nullable=False),
        sa.Column("record", sa.JSON(), nullable=False),
        sa.Column("ak_fingerprint", sa.String(length=71), nullable=False),
        sa.Column("release_key_id", sa.String(length=71), nullable=False),
        sa.Column("enrolled_at", sa.Float(), nullable=False),
        sa.Column("release_version", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("host_name"),
    )
    op.create_table(
        "releases",
        sa.Column("version", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("digest", sa.String(length=71), nullable=False),
        sa.Column("signed", sa.JSON(), nullable=False),
        sa.Column("published_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("version"),
    )
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "attestation_state", sa.String(length=16), nullable=False, server_default="unknown"
            )
        )
        batch_op.add_column(
            sa.Column("attestation", sa.JSON(), nullable=False, server_default="{}")
        )
        batch_op.add_column(sa.Column("attested_at", sa.Float(), nullable=True))
        batch_op.add_column(
            sa.Column("min_release_version", sa.BigInteger(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("trusted_host", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("instances", schema=None) as batch_op:
        batch_op.drop_column("trusted_host")
    with op.batch_alter_table("hosts", schema=None) as batch_op:
        batch_op.drop_column("min_release_version")
        batch_op.drop_column("attested_at")
        batch_op.drop_column("attestation")
        batch_op.drop_column("attestation_state")
    op.drop_table("releases")
    op.drop_table("host_enrolments")
