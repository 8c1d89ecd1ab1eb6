"""serve.py against the official `openai` client (a dev-only reference), on a random port, with a tiny random
model and two adapters over it: greedy answers equal generate.py's, streamed or not; each adapter and the bare
base answer as their own generate.py run; 8 concurrent clients get complete, unmixed answers; a client that
disconnects frees the queue; bad requests are OpenAI-style 4xx JSON and the server keeps serving; the chat page
streams an answer in headless Chromium."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import generate as gen_py
import model as M
import peft
from tests.peft_cases import randomize
from tests.tiny import REPO, make_tokenizer, tiny_config

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402  (openai's own HTTP client)

PROMPTS = ["hi", "what is two plus two", "tell me a story", "name a colour", "count to five", "why is the sky blue",
           "say something", "bye now"]
N = 16  # max tokens per answer


def make_base(path):
    """A tiny random llama whose greedy answers vary with the prompt (weights std 0.6: 0.1 repeats one char)."""
    m = M.Transformer(M.ModelConfig.from_hf(tiny_config()))
    m.init_weights(0.6, 1)
    M.save_pretrained(m, path)
    make_tokenizer(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    base = make_base(tmp / "tiny")
    adapters = {}
    for name, cfg in (("lora", peft.LoraConfig(r=4, alpha=8, targets="all-linear")), ("ia3", peft.IA3Config())):
        m = peft.apply(M.load_pretrained(base), cfg)
        randomize(m, seed=len(name))
        if name == "ia3":  # IA3's scales around 1 by 10%: make them matter
            with torch.no_grad():
                for p in peft.core.adapter_parameters(m).values():
                    p.mul_(torch.rand(p.shape, generator=torch.Generator().manual_seed(3)) * 2)
        adapters[name] = peft.save_adapter(m, tmp / name, base_model_path=str(base))
    port, log = free_port(), tmp / "server.log"
    cmd = [sys.executable, "serve.py", "--model", str(base), "--port", str(port), "--max-tokens", "64"]
    for name, d in adapters.items():
        cmd += ["--adapter", f"{name}={d}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(log.read_text())
        time.sleep(0.25)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield {"url": url, "client": client, "base": base, "adapters": adapters, "log": log, "tmp": tmp}
    proc.terminate()
    proc.wait(10)


def generate_py(capsys, *argv) -> str:
    """What `python generate.py ARGV` prints (its main, in-process)."""
    capsys.readouterr()
    gen_py.main([str(a) for a in argv])
    return capsys.readouterr().out.removesuffix("\n")


def expected(server, capsys, model, prompt, *more):
    adapter = ["--adapter", server["adapters"][model]] if model in server["adapters"] else []
    return generate_py(capsys, "--model", server["base"], *adapter, "--prompt", prompt, "--greedy",
                       "--max-new-tokens", N, *more)


def chat(server, model, prompt, stream=False, **kw):
    r = server["client"].chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                                 max_tokens=kw.pop("max_tokens", N), stream=stream,
                                                 **{"temperature": 0, **kw})
    if not stream:
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in r:
        text += chunk.choices[0].delta.content or ""
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


def test_models_lists_base_and_adapters(server):
    assert [m.id for m in server["client"].models.list()] == ["tiny", "lora", "ia3"]


def test_each_model_answers_like_its_generate_py_run(server, capsys):
    answers = {}
    for model in ("tiny", "lora", "ia3"):
        want = expected(server, capsys, model, PROMPTS[1])
        assert chat(server, model, PROMPTS[1])[0] == want
        assert chat(server, model, PROMPTS[1], stream=True)[0] == want
        answers[model] = want
    assert len(set(answers.values())) == 3, answers  # the adapters change the answer, the base is untouched
    # switching back and forth per request: the base still answers as before
    assert chat(server, "base", PROMPTS[1])[0] == answers["tiny"]


def test_completions_and_sampling_equal_generate_py(server, capsys):
    r = server["client"].completions.create(model="lora", prompt="Once upon", max_tokens=N, temperature=0)
    assert r.choices[0].text == expected(server, capsys, "lora", "Once upon", "--raw")
    stream = server["client"].completions.create(model="lora", prompt="Once upon", max_tokens=N, temperature=0,
                                                 stream=True)
    assert "".join(c.choices[0].text for c in stream) == r.choices[0].text
    chunks = list(server["client"].chat.completions.create(
        model="lora", messages=[{"role": "user", "content": "Once upon"}], max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    sampled = chat(server, "ia3", PROMPTS[2], temperature=0.9, top_p=0.8, seed=5)[0]
    assert sampled == chat(server, "ia3", PROMPTS[2], stream=True, temperature=0.9, top_p=0.8, seed=5)[0]
    assert sampled == generate_py(capsys, "--model", server["base"], "--adapter", server["adapters"]["ia3"],
                                  "--prompt", PROMPTS[2], "--temperature", 0.9, "--top-p", 0.8, "--seed", 5,
                                  "--max-new-tokens", N)
    assert sampled != expected(server, capsys, "ia3", PROMPTS[2])


def test_stop_strings_and_finish_reasons(server, capsys):
    full = expected(server, capsys, "tiny", PROMPTS[0])
    stop = full[6:8]
    for stream in (False, True):
        text, finish = chat(server, "tiny", PROMPTS[0], stream=stream, stop=[stop, "\x00never"])
        assert (text, finish) == (full[:full.index(stop)], "stop")
    text, finish = chat(server, "tiny", PROMPTS[0], max_tokens=3)
    assert finish == "length" and full.startswith(text)


def test_eight_concurrent_clients_get_their_own_answers(server, capsys):
    models = ["tiny", "lora", "ia3"]
    jobs = [(models[i % 3], p) for i, p in enumerate(PROMPTS)]
    want = [expected(server, capsys, m, p) for m, p in jobs]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: chat(server, j[0], j[1], stream=j[0] != "ia3")[0], jobs))
    assert got == want
    assert len(set(want)) == len(want)


def test_disconnecting_client_frees_its_slot(server, capsys):
    # PROMPTS[0]'s greedy answer runs 300 tokens without a stop token: long enough to be cut off
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 300,
            "stream": True, "temperature": 0}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", server["url"] + "/v1/chat/completions", json=body) as r:
            chunks = (line for line in r.iter_lines() if '"content"' in line)
            for _ in range(3):
                next(chunks)
    t0 = time.perf_counter()
    assert chat(server, "lora", PROMPTS[3])[0] == expected(server, capsys, "lora", PROMPTS[3])
    waited = time.perf_counter() - t0
    for _ in range(40):
        log = server["log"].read_text()
        if "cancelled" in log:
            break
        time.sleep(0.25)
    cut = [line for line in log.splitlines() if "cancelled" in line]
    assert cut and 3 <= int(cut[-1].split(" + ")[1].split()[0]) < 300, log
    assert waited < 30


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, capsys):
    url = server["url"] + "/v1/chat/completions"
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [(b"{not json", 400, None), ({**ok, "model": "nope"}, 404, "model_not_found"),
             ({**ok, "max_tokens": -1}, 400, "invalid_value"), ({**ok, "temperature": "hot"}, 400, "invalid_value"),
             ({**ok, "messages": [{"role": "user", "content": "x" * 600}]}, 400, "context_length_exceeded"),
             ({**ok, "messages": "hi"}, 400, None), ({**ok, "stop": [1]}, 400, None), ([1, 2], 400, None)]
    for body, status, code in cases:
        r = httpx.post(url, content=body if isinstance(body, bytes) else json.dumps(body), timeout=30)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"] and err["code"] == code, err
    assert httpx.get(server["url"] + "/v1/nothing").json()["error"]["message"] == "Not Found"
    with pytest.raises(openai.NotFoundError):
        chat(server, "nope", "hi")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        chat(server, "tiny", "hi", max_tokens=-5)
    assert chat(server, "tiny", PROMPTS[0])[0] == expected(server, capsys, "tiny", PROMPTS[0])


def test_api_key_and_default_host(tmp_path):
    """In-process (starlette's TestClient): --api-key is required when set; 127.0.0.1 unless --host is given."""
    import argparse

    from starlette.testclient import TestClient

    import serve
    assert serve.parse_args([]).host == "127.0.0.1"
    args = argparse.Namespace(model=str(make_base(tmp_path / "m")), adapter=[], dtype="fp32", device="cpu",
                              max_tokens=4, api_key="sekret")
    app = serve.build_app(serve.load_state(args))
    with TestClient(app) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sekret"}).json()["data"][0]["id"] == "m"
        assert "<script>" in c.get("/").text  # the page itself needs no key


def test_missing_fastapi_is_one_line(monkeypatch):
    import serve
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(SystemExit) as e:
        serve.main([])
    assert "pip install -r requirements-serve.txt" in str(e.value.code) and "\n" not in str(e.value.code)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


def test_chat_page_streams_an_answer_in_chromium(server, capsys, tmp_path):
    if not (CHROMIUM and DRIVER):
        pytest.skip("no Chromium + chromedriver: apt-get install -y chromium chromium-driver (Debian/Ubuntu)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,640"):
        opts.add_argument(a)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    try:
        driver.get(server["url"] + "/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "model")).options) == 3)
        Select(driver.find_element(By.ID, "model")).select_by_value("lora")
        t = driver.find_element(By.ID, "temperature")
        t.clear()
        t.send_keys("0")
        driver.find_element(By.ID, "input").send_keys(PROMPTS[1] + "\n")
        done = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".assistant[data-done='1']"))
        shot = tmp_path / "chat.png"
        driver.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        # the page asks for the server's default max_tokens (64 here): its answer starts with generate.py's
        want = generate_py(capsys, "--model", server["base"], "--adapter", server["adapters"]["lora"], "--prompt",
                           PROMPTS[1], "--greedy", "--max-new-tokens", 64)
        assert done[0].text == want.strip() or done[0].get_attribute("textContent") == want
    finally:
        driver.quit()
