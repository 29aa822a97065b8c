"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Isolated operations run in every environment's schema (public, dev, ...);
shared operations run in public only.
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa
${imports if imports else ""}
from momentry_db.revision import on_primary

# revision identifiers, used by Alembic.
revision: str = ${repr(up_revision)}
down_revision: Union[str, Sequence[str], None] = ${repr(down_revision)}
branch_labels: Union[str, Sequence[str], None] = ${repr(branch_labels)}
depends_on: Union[str, Sequence[str], None] = ${repr(depends_on)}


def upgrade() -> None:
    upgrade_isolated()
    if on_primary():
        upgrade_shared()


def downgrade() -> None:
    if on_primary():
        downgrade_shared()
    downgrade_isolated()


def upgrade_isolated() -> None:
    """Isolated: runs once per environment schema."""
    ${context.get("isolated_upgrades", "pass")}


def downgrade_isolated() -> None:
    """Isolated: runs once per environment schema."""
    ${context.get("isolated_downgrades", "pass")}


def upgrade_shared() -> None:
    """Shared: runs in public only."""
    ${context.get("shared_upgrades", "pass")}


def downgrade_shared() -> None:
    """Shared: runs in public only."""
    ${context.get("shared_downgrades", "pass")}
