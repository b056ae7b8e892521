"""What the daemon and kmodctl share: the contracts users and scripts depend on for years.

    contract.journal   the journal schema as data: record types (MESSAGE_ID, PRIORITY) and
                       fields (KMODD_*, with meaning and the sources that write them)
    contract.status    the typed io.kmodd.Status document (built by daemon/status.py,
                       rendered by cli/online.py)

Beside kmodd.wire (the control protocol's framing).  These modules import nothing from
kmodd.daemon or kmodd.cli (tests/test_linters.py checks it); both of those import them.
The outcome of a decision (allow | deny | would_deny) is policy vocabulary:
kmodd.policy.types.Outcome, `Decision.outcome`.

How to add a journal field: one line in `journal.Field` (name, meaning, record kinds,
sources, optional).  Then write it where the record is built (daemon/records.py) and add
its row to docs/journal.md: tests/contract/test_journal_schema.py fails until the docs
and systemd/kmodd.catalog name only fields the schema knows, and every field is documented.

How to add a status entry: one key in the TypedDict it belongs to in `status.py`
(`NotRequired[...]` if an older daemon may lack it).  mypy --strict then names the one
builder in daemon/status.py that must fill it; cli/online.py renders what it wants of it.
"""
