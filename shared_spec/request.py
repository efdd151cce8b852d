"""The request-side `placement` field, as clients send it to the server.

The server reads it from `extra_body={"placement": ...}`, from `vllm_xargs`, or offline from
`SamplingParams(extra_args={"placement": ...})`; this schema is what all three accept.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

PLACEMENT_DESCRIPTION = (
    "Mixer per decoder layer: a list of mixer names (one per layer, or one per layer with a choice), "
    "a compact run-length string such as 'attention*2,gdn*' (NAME, NAME*COUNT, or one NAME* that fills "
    "the remaining layers), or the name of a preset stored with the checkpoint. "
    "Omitted: the checkpoint's default placement."
)


class PlacementRequest(BaseModel):
    """The fields this project adds to a completion request."""

    model_config = ConfigDict(extra="ignore")

    placement: str | list[str] | None = Field(
        None,
        description=PLACEMENT_DESCRIPTION,
        examples=[["attention", "gdn", "gdn", "kda"], "attention,gdn*2,kda", "gdn*", "fast"],
    )


def placement_request_json_schema() -> dict[str, Any]:
    return PlacementRequest.model_json_schema()


def main() -> None:
    print(json.dumps(placement_request_json_schema(), indent=2))


if __name__ == "__main__":
    main()
