"""The request-side `placement` fields, as clients send them to the server.

The server reads it from `extra_body={"placement": ...}`, from `vllm_xargs`, or offline from
`SamplingParams(extra_args={"placement": ...})`; this schema is what all three accept.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    min_quality: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Instead of a placement: the fastest served preset whose recorded quality (held-out top-1 "
        "agreement with the teacher, all-attention = 1.0) is at least this; on a deployment with a load policy, the "
        "best-quality one at idle and cheaper ones meeting the floor under load. HTTP 400 naming the best available "
        "when none qualifies. The choice is reported in the `x-supernet-placement` / `x-supernet-preset` headers.",
        examples=[0.95],
    )
    min_speedup: float | None = Field(
        None,
        gt=0,
        description="Instead of a placement: the best-quality served preset whose recorded decode speed-up over "
        "all-attention is at least this factor (with min_quality too: the fastest meeting both).",
        examples=[2.0],
    )

    draft_placement: str | list[str] | None = Field(
        None,
        description="On a deployment serving self-speculative decoding (`vllm_supernet.speculative.SelfSpeculator`): "
        "the placement that drafts this request's tokens, in any form `placement` takes; the request's own "
        "placement verifies them, so the output is the same. Omitted: the deployment's "
        "`supernet_draft_placement`.",
        examples=["gdn*", "sliding_window*"],
    )

    @model_validator(mode="after")
    def _one_way_to_choose(self) -> PlacementRequest:
        if self.placement is not None and (self.min_quality is not None or self.min_speedup is not None):
            raise ValueError("give either `placement` or a service level (`min_quality` / `min_speedup`), not both")
        return self


def placement_request_json_schema() -> dict[str, Any]:
    return PlacementRequest.model_json_schema()


def main() -> None:
    print(json.dumps(placement_request_json_schema(), indent=2))


if __name__ == "__main__":
    main()
