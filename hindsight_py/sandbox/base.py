"""What every sandbox shares, whatever language its plugin is written in."""

from __future__ import annotations

from dataclasses import dataclass


class PluginError(Exception):
    """The plugin failed to load or was terminated; str() is the text logged and written to its .err file."""


@dataclass(slots=True)
class BatchResult:
    """The outcome of handing a batch of messages to an analysis or output plugin."""

    processed: int  # messages fully handled (the one that asked for a retry is not counted)
    status: str  # "ok" | "retry" | "terminate"
    error: str | None
    commit_index: int  # 1-based index of the last message whose position may be committed; 0 = none
    failures: int
    batching: bool  # the plugin holds messages it has not committed yet (-4)
