"""Library entry points of the annotation platform; the web routes and the CLI are thin shells over these.

Each write function runs ONE transaction on the session it is given: it takes the write lock
(`engine.begin_write`), changes rows, appends journal entries and commits, or rolls everything back and
raises. No FastAPI imports here, so the quickstart can simulate annotators through the same code path.

Modules (each imports only those above it):
    errors    ServiceError and its HTTP-status subclasses
    sessions  `connect`: the workspace database's session factory
    users     users, API tokens, QC actions and `can_manage`, the one rule of who may manage whom
    projects  projects, guideline and question-schema versions
    items     item normalising and import, the JSONL reader, `items_from_generation`, uncertainty priorities, expert routing
    tasks     current / next / submit / skip
    judging   `run_judge`: an AI judge labels tasks as an account of kind "ai", with hybrid routing to people
    views     read-only views: a response, progress, queue, throughput, judgments, QC actions, the journal

`from alignflow.feedback import services; services.<name>` reaches every public name below.
"""

from alignflow.feedback.services.errors import Conflict, Forbidden, Invalid, NotFound, ServiceError
from alignflow.feedback.services.items import (
    MAX_CANDIDATE_CHARS,
    gold_answer,
    import_items,
    items_from_generation,
    mark_ambiguous,
    prioritize_items,
    read_items_jsonl,
    scorer_member_rewards,
)
from alignflow.feedback.services.judging import JudgeRunResult, in_fraction, run_judge
from alignflow.feedback.services.projects import (
    create_project,
    get_project,
    guideline,
    list_projects,
    new_guideline_version,
    new_schema_version,
    schema_spec,
)
from alignflow.feedback.services.sessions import connect
from alignflow.feedback.services.tasks import SubmitResult, current_task, next_task, skip, submit, task_view
from alignflow.feedback.services.users import (
    MANAGERS,
    _user,
    add_ai_user,
    add_user,
    apply_qc,
    can_manage,
    can_see,
    create_token,
    end_session,
    get_user,
    judge_username,
    list_users,
    own_qc_state,
    public_judge_spec,
    revert_qc,
    revoke_token,
    set_disabled,
)
from alignflow.feedback.services.views import (
    JOURNAL_MAX,
    journal,
    load_judgments,
    progress,
    qc_actions,
    queue_state,
    response_view,
    throughput,
    visible_usernames,
)

__all__ = [
    "JOURNAL_MAX",
    "MANAGERS",
    "MAX_CANDIDATE_CHARS",
    "Conflict",
    "Forbidden",
    "Invalid",
    "JudgeRunResult",
    "NotFound",
    "ServiceError",
    "SubmitResult",
    "_user",
    "add_ai_user",
    "add_user",
    "apply_qc",
    "can_manage",
    "can_see",
    "connect",
    "create_project",
    "create_token",
    "current_task",
    "end_session",
    "get_project",
    "get_user",
    "gold_answer",
    "guideline",
    "import_items",
    "in_fraction",
    "items_from_generation",
    "journal",
    "judge_username",
    "list_projects",
    "list_users",
    "load_judgments",
    "mark_ambiguous",
    "new_guideline_version",
    "new_schema_version",
    "next_task",
    "own_qc_state",
    "prioritize_items",
    "progress",
    "public_judge_spec",
    "qc_actions",
    "queue_state",
    "read_items_jsonl",
    "response_view",
    "revert_qc",
    "revoke_token",
    "run_judge",
    "schema_spec",
    "scorer_member_rewards",
    "set_disabled",
    "skip",
    "submit",
    "task_view",
    "throughput",
    "visible_usernames",
]
