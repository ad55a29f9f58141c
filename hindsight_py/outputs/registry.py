"""The output extensions every plugin host loads (outputs/extension.py): one line per output type.

A new output type (Kafka, S3, ...) adds its extension here; the hosts, the read loop and the
sandboxes do not change.
"""

from __future__ import annotations

from hindsight_py.outputs.elasticsearch_lua import ElasticsearchLua
from hindsight_py.outputs.extension import OutputExtension, OutputHost


def output_extensions(host: OutputHost) -> list[OutputExtension]:
    """The extensions of one plugin, created with its host."""
    return [ElasticsearchLua(host)]


__all__ = ["output_extensions"]
