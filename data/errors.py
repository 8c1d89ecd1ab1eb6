"""DataError (one line naming file:line) and Notes: what the readers did not use or changed, said once per file."""
import sys


class DataError(ValueError):
    """A malformed record or file; str(e) is one line naming file:line and the problem."""


class Notes:
    """Warnings counted per file and record: `data.jsonl: field 'images' ignored in 40 records (first: line 3)`.
    strict (--strict-data): the first one is a DataError instead. verbose=False: counted, not printed."""

    def __init__(self, strict: bool = False, verbose: bool = True, max_skipped: int = 20):
        self.strict, self.verbose, self.max_skipped = strict, verbose, max_skipped
        self.counts, self.lines, self.skipped = {}, [], 0  # counts: message -> [records, first where, last where]

    def add(self, where: str, message: str):
        if self.strict:
            raise DataError(f"{where}: {message} (--strict-data makes this an error)")
        c = self.counts.setdefault(message, [0, where, None])
        if c[2] != where:  # a record counts once per message
            c[0], c[2] = c[0] + 1, where

    def skip(self, error: DataError):
        """--skip-bad-records: say which record (the first max_skipped of them, then a count at the end)."""
        self.skipped += 1
        if self.verbose and self.skipped <= self.max_skipped:
            print(f"warning: skipped {error}", file=sys.stderr)

    def flush(self, path):
        """One line per message for the file just read."""
        for message, (n, first, _) in self.counts.items():
            line = f"warning: {path}: {message} in {n} record{'s' * (n != 1)} (first: {first.rsplit(':', 1)[-1]})"
            self.lines.append(line)
            if self.verbose:
                print(line, file=sys.stderr)
        if self.verbose and self.skipped > self.max_skipped:
            print(f"warning: {path}: {self.skipped - self.max_skipped} more bad records skipped", file=sys.stderr)
        self.counts, self.skipped = {}, 0
