"""ESamp through the OpenAI-compatible API of a server started with `--sampler esamp`.

    python -m sglang.launch_server --model-path MODEL --sampler esamp --port 30000
    python examples/openai_client.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import openai


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("-n", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.1)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=args.url + "/v1", api_key="none")
    # The n samples of one request share one Distiller: each pushes the others away.
    response = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Name a surprising use for a paperclip."}],
        n=args.n,
        temperature=0.8,
        top_p=0.95,
        max_tokens=48,
        extra_body={"custom_params": {"sampling": "esamp", "beta": args.beta}},
    )
    for choice in response.choices:
        print(f"[{choice.index}] {' '.join(choice.message.content.split())}")


if __name__ == "__main__":
    main()
