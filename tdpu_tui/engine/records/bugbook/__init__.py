"""The bug book: `phase3_logs/bugs_found.md`, read and written without losing a byte.

- `model`: what a record is and the values it accepts (validation, stage and status values);
- `codec`: the file as text, parsed in place and written back keeping every byte not edited;
- `book`: one session's view of the file, its lock, merges with edits made elsewhere, and the
  state kept beside it (last number, drafted signatures);
- `drafts`: records drafted from failed stages, one rule for every face.
"""

from tdpu_tui.engine.records.bugbook.book import BookState, BugBook, ensure_book
from tdpu_tui.engine.records.bugbook.codec import BugDocument, parse_bugs
from tdpu_tui.engine.records.bugbook.drafts import (
    DRAFT_TAIL_LINES, draft_error, draft_from_failure, draft_record, draft_title,
    failure_signature, is_filed, record_failure, strip_ansi,
)
from tdpu_tui.engine.records.bugbook.model import (
    CONFLICT_KEY, FIELD_KEYS, FIELD_LABELS, MAX_NUMBER_DIGITS, STAGE_VALUES, STATUS_ALIASES,
    STATUS_VALUES, TEMPLATE_HEADER, TIME_FORMAT, TITLE_LINE, BugBookError, BugRecord,
    BugValidationError, field_problems, parse_stage, parse_status, stage_label,
)

__all__ = [
    "CONFLICT_KEY", "DRAFT_TAIL_LINES", "FIELD_KEYS", "FIELD_LABELS", "MAX_NUMBER_DIGITS",
    "STAGE_VALUES", "STATUS_ALIASES", "STATUS_VALUES", "TEMPLATE_HEADER", "TIME_FORMAT",
    "TITLE_LINE", "BookState", "BugBook", "BugBookError", "BugDocument", "BugRecord",
    "BugValidationError", "draft_error", "draft_from_failure", "draft_record", "draft_title",
    "ensure_book", "failure_signature", "field_problems", "is_filed", "parse_bugs",
    "parse_stage", "parse_status", "record_failure", "stage_label", "strip_ansi",
]
