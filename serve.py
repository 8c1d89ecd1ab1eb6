"""An OpenAI-compatible server for a model and several adapters over it, with a chat page at `/`.

    python serve.py --model DIR|FILE.gguf --adapter nano=runs/default/adapter --adapter other=DIR [--port 8000]
    curl localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
         -d '{"model": "nano", "messages": [{"role": "user", "content": "Who are you?"}]}'

Endpoints: POST /v1/chat/completions and /v1/completions (both streaming with "stream": true, as server-sent
events, or not), GET /v1/models, GET / (web/chat.html). Request fields: model, messages / prompt, temperature,
top_p, max_tokens (or max_completion_tokens), stop, seed, stream, stream_options.include_usage. The request's
`model` picks the bare base (its directory name, or "base") or one `--adapter NAME=DIR`. Every adapter is built
once at start over the SAME base tensors (its own module tree whose 2-D weights are the base's Parameters: no
copy, no reload), so switching is picking a tree. Adapters are never merged here: that would write into the
shared weights.

Requests are queued and answered one at a time by a single generation thread, so they are never mixed, and
each is exactly what `generate.py` prints for it (the same model.sampling.generate, the same chat template); a
client that disconnects is noticed within half a second and its generation stops. Errors are OpenAI's JSON
({"error": {"message", "type", "param", "code"}}) with a 4xx status. It listens on 127.0.0.1 unless --host says
otherwise; --api-key makes every /v1 request need `Authorization: Bearer KEY`.

Built on FastAPI + uvicorn (what vLLM and LLaMA-Factory serve with): the standard library's http.server has no
asyncio, so noticing a client that went away while another request holds the model, and streaming to several
waiting clients at once, would mean hand-written socket code. They are needed by this file only:
pip install -r requirements-serve.txt
"""
import argparse
import asyncio
import copy
import hmac
import json
import math
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

PAGE = Path(__file__).resolve().parent / "web" / "chat.html"


class Stop(Exception):
    """Raised from generate's on_token callback to end a generation (a stop string, or a cancelled request)."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.kind = status, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    model: object
    ids: list
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, *event):  # from the generation thread to the request's coroutine
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def share_base(base):
    """A new module tree over the same 2-D weights (matrices, embeddings: the bulk), other tensors copied (norms,
    biases: BitFit trains those in place)."""
    return copy.deepcopy(base, memo={id(p): p for p in base.parameters() if p.dim() == 2})


def held_back(text: str, stops: list) -> int:
    """How many trailing characters could still become a stop string (or complete a UTF-8 character)."""
    if text.endswith("\ufffd"):
        return len(text)
    return max([k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])] or [0])


def run_job(job: Job, tok, stop_ids):
    """Generate for one job, sending ("delta", text) events and a final ("done", finish_reason, n_tokens)."""
    from model.sampling import generate
    sent, out, finish = "", [], "length"
    if job.cancelled.is_set():  # its client left while it waited in the queue: not even the prompt is run
        job.send("done", "cancelled", 0)
        return "cancelled", 0

    def on_token(ids):
        nonlocal sent, finish
        if job.cancelled.is_set():
            finish = "cancelled"
            raise Stop
        out[:] = ids
        text = tok.decode(ids)
        cut = min((i for i in (text.find(s) for s in job.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, finish = text[:cut], "stop"
        end = len(text) if cut >= 0 else len(text) - held_back(text, job.stop)
        if end > len(sent):
            job.send("delta", text[len(sent):end])
            sent = text[:end]
        if cut >= 0:
            raise Stop
    gen = torch.Generator(device=next(job.model.parameters()).device).manual_seed(job.seed)
    try:
        ids = generate(job.model, job.ids, job.max_tokens, stop_ids, job.temperature, 0, job.top_p, gen, on_token)
        out, finish = ids, ("stop" if len(ids) < job.max_tokens else "length")
        text = tok.decode(ids)
        if len(text) > len(sent):
            job.send("delta", text[len(sent):])
    except Stop:
        pass
    job.send("done", finish, len(out))
    return finish, len(out)


def worker(jobs: queue.Queue, tok, stop_ids):
    while True:
        job = jobs.get()
        t0 = time.perf_counter()
        try:
            finish, n = run_job(job, tok, stop_ids)
            print(f"[serve] {len(job.ids)} prompt + {n} tokens, {finish}, {time.perf_counter() - t0:.2f} s",
                  file=sys.stderr, flush=True)
        except Exception as e:  # a bug must not kill the thread that serves everyone
            job.send("error", f"{type(e).__name__}: {e}")


# ------------------------------------------------------------------------------------------------- requests
def number(body, key, default, lo, hi, kind=float):
    v = body.get(key, default)
    if v is None:
        v = default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer())
    if not ok or not (lo <= v <= hi) or (kind is float and not math.isfinite(v)):
        raise ApiError(400, f"{key}={v!r}: expected {'an integer' if kind is int else 'a number'} in "
                       f"[{lo}, {hi}]", key, "invalid_value")
    return kind(v)


def parse_request(body, chat: bool, state) -> Job:
    """Check a request's fields and build its Job (prompt rendered and encoded); ApiError for what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    name = body.get("model")
    if name not in state["models"]:
        raise ApiError(404, f"The model {name!r} does not exist (available: {', '.join(state['models'])})",
                       "model", "model_not_found")
    tok, ctx = state["tok"], state["context"]
    if chat:
        msgs = body.get("messages")
        if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                       and isinstance(m.get("content"), str) for m in msgs)):
            raise ApiError(400, "messages: expected a non-empty list of {role, content} objects with string "
                           "content", "messages")
        try:
            text = tok.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in msgs], True)
        except Exception as e:  # the model's template may refuse a conversation (raise_exception)
            raise ApiError(400, f"the chat template refused these messages: {str(e).splitlines()[0]}",
                           "messages") from None
        ids = tok.encode(text, add_special_tokens=False)
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "prompt: expected a non-empty string", "prompt")
        ids = tok.encode(prompt)
    if body.get("n", 1) != 1:
        raise ApiError(400, "n: only n=1 is supported", "n")
    if len(ids) >= ctx:
        raise ApiError(400, f"This model's maximum context length is {ctx} tokens; the prompt has {len(ids)}",
                       "messages" if chat else "prompt", "context_length_exceeded")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, key, min(state["max_tokens"], ctx - len(ids)), 1, ctx - len(ids), int)
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "stop: expected a string or a list of at most 4 non-empty strings", "stop")
    seed = body.get("seed")
    return Job(state["models"][name], ids, max_tokens, number(body, "temperature", 1.0, 0, 2),
               number(body, "top_p", 1.0, 1e-9, 1), int(torch.randint(2**62, ()) if seed is None else
                                                         number(body, "seed", 0, 0, 2**63 - 1, int)),
               stop, asyncio.get_running_loop())


def build_app(state):
    from fastapi import FastAPI, Request
    from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="nanotune", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e):  # unknown routes and methods, in OpenAI's shape too
        return JSONResponse(ApiError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def authorize(request: Request):
        key = state["api_key"]
        given = request.headers.get("authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key",
                           kind="authentication_error")

    async def events(request: Request, job: Job):
        """The job's events, while the client is connected; cancels the job when it goes away."""
        state["jobs"].put(job)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), 0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if event[0] == "error":
                    raise ApiError(500, event[1], kind="server_error")
                yield event
                if event[0] == "done":
                    return
        finally:
            job.cancelled.set()

    async def complete(request: Request, chat: bool):
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({e})") from None
        job = parse_request(body, chat, state)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": body["model"]}

        def choice(text, finish, delta=False):
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            msg = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": 0, ("delta" if delta else "message"): msg, "finish_reason": finish}

        def usage(n):
            return {"prompt_tokens": len(job.ids), "completion_tokens": n, "total_tokens": len(job.ids) + n}

        if body.get("stream"):
            async def sse():
                obj = {**head, "object": "chat.completion.chunk"} if chat else head
                if chat:
                    first = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                    yield f"data: {json.dumps({**obj, 'choices': [first]})}\n\n"
                try:
                    async for e in events(request, job):
                        c = choice(e[1], None, True) if e[0] == "delta" else choice("", e[1], True)
                        if e[0] == "done" and chat:
                            c["delta"] = {}
                        yield f"data: {json.dumps({**obj, 'choices': [c]})}\n\n"
                        if e[0] == "done" and (body.get("stream_options") or {}).get("include_usage"):
                            yield f"data: {json.dumps({**obj, 'choices': [], 'usage': usage(e[2])})}\n\n"
                except ApiError as e:
                    yield f"data: {json.dumps(e.body())}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts, finish, n = [], None, 0
        async for e in events(request, job):
            if e[0] == "delta":
                parts.append(e[1])
            else:
                finish, n = e[1], e[2]
        return {**head, "choices": [choice("".join(parts), finish)], "usage": usage(n)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": n, "object": "model", "created": state["created"],
                                            "owned_by": "nanotune"} for n in state["models"] if n != "base"]}

    @app.get("/")
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    return app


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model dir or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                    help="an adapter served as model NAME (repeat for several)")
    ap.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 requests")
    ap.add_argument("--max-tokens", type=int, default=512, help="the default max_tokens of a request")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return ap.parse_args(argv)


def load_state(args) -> dict:
    """The base, one module tree per adapter over its weights, the tokenizer: what the app serves."""
    import generate
    import peft
    gen_args = argparse.Namespace(model=args.model, adapter=None, dtype=args.dtype, device=args.device)
    base, tok = generate.load(gen_args)
    name = Path(gen_args.model).stem
    models = {name: base, "base": base}
    for spec in args.adapter:
        aname, sep, path = spec.partition("=")
        if not sep or not aname or not path or aname in models:
            raise ValueError(f"--adapter {spec!r}: expected NAME=DIR with a new NAME")
        models[aname] = peft.load_adapter(share_base(base), path).eval()
    return {"models": models, "tok": tok, "context": base.cfg.max_position_embeddings, "jobs": queue.Queue(),
            "max_tokens": args.max_tokens, "api_key": args.api_key, "created": int(time.time())}


def main(argv=None):
    args = parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        sys.exit(f"error: serve.py needs FastAPI and uvicorn ({e.name} is missing): "
                 f"pip install -r requirements-serve.txt")
    from model import CheckpointError
    try:
        state = load_state(args)
    except (CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    threading.Thread(target=worker, args=(state["jobs"], state["tok"], state["tok"].stop_ids), daemon=True).start()
    print(f"serving {', '.join(n for n in state['models'] if n != 'base')} on http://{args.host}:{args.port}",
          file=sys.stderr, flush=True)
    uvicorn.run(build_app(state), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
