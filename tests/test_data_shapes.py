"""Bring-your-own-data shapes (tools, content parts, TRL prompt/completion, per-turn weights, sharegpt system and
function calls, developer role) rendered and masked exactly as transformers' apply_chat_template (tools=...) on
SmolLM2's template and on Qwen2.5's (tool support), token by token; axolotl segments, TRL standard completions,
truncation and --system."""
import json

import numpy as np
import pytest

import data
import model as M
from model.tokenizer import hermes_messages
from tests.reference import run_reference
from tests.tiny import make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# SmolLM2-135M-Instruct's chat template, as its GGUF ships it (no tool support: a default system prompt, ChatML)
SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
           "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
           "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2.5-Instruct's chat template (the structure of the public one: tools in the system turn, <tool_call> JSON in
# the assistant turn, consecutive tool results in one user turn of <tool_response> blocks)
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"name": "get_time", "description": "Local time", "parameters": {"type": "object", "properties": {}}}
# each shape as its users' files have it (OpenAI / TRL, LLaMA-Factory, axolotl), none in nanotune's own form
RECORDS = {
    "openai_tools": {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "You help with weather."},
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C, sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "9 C, rain"},
        {"role": "assistant", "content": "Paris: 18 C and sunny; Oslo: 9 C with rain."}]},
    "sharegpt_function_call": {
        "system": "You tell the time.", "tools": json.dumps([TIME, WEATHER["function"]]), "conversations": [
            {"from": "human", "value": "What time is it, and is it raining in Rome?"},
            {"from": "function_call", "value": json.dumps({"name": "get_time", "arguments": {}})},
            {"from": "observation", "value": "14:05"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Rome"}})},
            {"from": "observation", "value": "dry"},
            {"from": "gpt", "value": "It is 14:05 and dry in Rome."}]},
    "content_parts": {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Name a colour"}, {"type": "text", "text": "."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Blue."}]},
        {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Red."}]},
    "per_turn_weights": {"messages": [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5", "weight": 0},
        {"role": "user", "content": "Wrong. 2+2?"}, {"role": "assistant", "content": "4", "weight": 1},
        {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "7", "train": False},
        {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "6", "loss_weight": 1.0}]},
    "trl_conversational_completion": {
        "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "Your name?"}],
        "completion": [{"role": "assistant", "content": "Nano."}]},
    "sharegpt_system_developer": {"system": "You are Nano.", "conversations": [
        {"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "Nano."},
        {"from": "developer", "value": "Answer in French from now on."},
        {"from": "human", "value": "Who are you?"}, {"from": "gpt", "value": "Je suis Nano."}]},
}
TOOL_CASES = ("openai_tools", "sharegpt_function_call")


def chat(name):
    kind, c = data.normalise(RECORDS[name], name)
    assert kind == "chat"
    return c


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = make_tokenizer(tmp_path_factory.mktemp("tok"))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": SMOLLM2}))
    return d


def reference(tok_dir, workdir):
    """transformers' rendering, ids and trained-token mask of each case on each template. The mask: for every
    assistant turn that trains, tokens from len(prefix + generation prompt) to the end of its turn minus the
    newline after <|im_end|> (HF's own tokenised prefixes, with tools= passed to every render). SmolLM2's template
    has no tool support: its tool cases are referenced by Qwen2.5's rendering (nanotune's built-in rendering is
    Qwen2.5's text; both templates are ChatML and the cases have a system message)."""
    cases = {f"{t}/{n}": {"msgs": list(chat(n)), "tools": chat(n).tools,
                          "trained": [i for i, m in enumerate(chat(n)) if m["role"] == "assistant"
                                      and i not in chat(n).untrained],
                          "template": QWEN25 if t == "qwen25" or n in TOOL_CASES else SMOLLM2}
             for t in ("smollm2", "qwen25") for n in RECORDS}
    (workdir / "cases.json").write_text(json.dumps(cases))
    run_reference(f"""
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained("{tok_dir}")
        out = {{}}
        for key, c in json.load(open("cases.json")).items():
            msgs, tools, tmpl = c["msgs"], c["tools"], c["template"]
            render = lambda m, gp=False: tok.apply_chat_template(m, tools=tools, chat_template=tmpl, tokenize=False,
                                                                 add_generation_prompt=gp)
            text = render(msgs)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            mask = [0] * len(ids)
            for i in c["trained"]:
                a = len(tok(render(msgs[:i], True), add_special_tokens=False)["input_ids"])
                b = len(tok(render(msgs[:i + 1]), add_special_tokens=False)["input_ids"])
                assert tok.decode(ids[b - 2:b]) == "<|im_end|>\\n"
                mask[a:b - 1] = [1] * (b - 1 - a)
            out[key] = {{"text": text, "ids": ids, "mask": mask}}
        json.dump(out, open("hf.json", "w"))
    """, workdir)
    return json.loads((workdir / "hf.json").read_text())


@pytest.fixture(scope="module")
def hf(tok_dir, tmp_path_factory):
    return reference(tok_dir, tmp_path_factory.mktemp("hf"))


def check_case(tok, hf, key):
    template, name = key.split("/")
    c = chat(name)
    ours = None if template == "smollm2" else QWEN25
    ex = data.encode_record(tok, "chat", c, seq_len=8192, template=ours)[0]
    assert tok.apply_chat_template(c, template=ours, tools=c.tools) == hf[key]["text"], key
    assert ex.ids.tolist() == hf[key]["ids"], key
    assert ex.train.astype(int).tolist() == hf[key]["mask"], key
    return ex


@pytest.mark.parametrize("template", ["smollm2", "qwen25"])
@pytest.mark.parametrize("name", sorted(RECORDS))
def test_shape_renders_and_masks_like_transformers(tok_dir, hf, template, name):
    tok = M.load_tokenizer(tok_dir)
    ex = check_case(tok, hf, f"{template}/{name}")
    trained = tok.decode(ex.ids[ex.train].tolist(), skip_special_tokens=False)
    if name == "per_turn_weights":  # weight 0 / train: false answers are not trained; weight 1 / loss_weight 1 are
        assert trained == "4<|im_end|>6<|im_end|>"
    if name == "trl_conversational_completion":  # the prompt's own assistant turn is context, not a target
        assert trained == "Nano.<|im_end|>"
    if name in TOOL_CASES:  # the tool-call turns train, the tool results never do
        assert "<tool_call>" in trained and "<tool_response>" not in trained
        assert "18 C, sunny" not in trained and "14:05<" not in trained


@pytest.mark.slow
def test_shapes_with_real_smollm2_tokenizer(tmp_path):
    """The same on SmolLM2's own tokenizer (byte-level BPE with merges: offsets, not characters)."""
    from model.gguf import default_model
    hf = reference(default_model(), tmp_path)
    tok = M.load_tokenizer(default_model())
    assert tok.chat_template == SMOLLM2
    for key in hf:
        check_case(tok, hf, key)


def test_builtin_tool_rendering_is_qwen25_on_chatml(tok_dir):
    """SmolLM2's template knows no tools: the conversation is rewritten (hermes_messages) into plain messages whose
    ChatML rendering is Qwen2.5's; nothing of the tools is dropped."""
    tok = M.load_tokenizer(tok_dir)
    for name in TOOL_CASES:
        c = chat(name)
        assert tok.apply_chat_template(c, tools=c.tools) == tok.apply_chat_template(c, template=QWEN25,
                                                                                    tools=c.tools)
    # without a system message the tool block is the system message (the template's default system prompt goes)
    c = chat("openai_tools")
    text = tok.apply_chat_template(c[1:], tools=c.tools)
    assert text.startswith("<|im_start|>system\n# Tools\n") and "SmolLM" not in text
    assert [m["role"] for m in hermes_messages(c, c.tools)] == ["system", "user", "assistant", "user", "assistant"]


def test_template_that_drops_tools_is_an_error(tok_dir):
    tok = M.load_tokenizer(tok_dir)
    lying = SMOLLM2 + "{# tools and tool_calls: not really #}"  # says it knows tools, renders none
    c = chat("openai_tools")
    with pytest.raises(ValueError, match="dropped tool text 'get_weather'"):
        data.encode_record(tok, "chat", c, 4096, template=lying)


def test_trl_standard_completion_and_axolotl_segments(tok_dir):
    tok = M.load_tokenizer(tok_dir)
    kind, p = data.normalise({"prompt": "The sky is", "completion": " blue."}, "x")
    ex = data.encode_record(tok, kind, p, 512)[0]
    assert tok.decode(ex.ids.tolist(), skip_special_tokens=False) == "The sky is blue.<|im_end|>"
    assert tok.decode(ex.ids[ex.train].tolist(), skip_special_tokens=False) == " blue.<|im_end|>"
    assert not ex.train[:len("The sky is")].any()
    segs = {"segments": [{"label": False, "text": "<|im_start|>user\nhi<|im_end|>\n"},
                         {"label": True, "text": "<|im_start|>assistant\nyo<|im_end|>"},
                         {"label": False, "text": "\n"}]}
    kind, p = data.normalise(segs, "x")
    ex = data.encode_record(tok, kind, p, 512)[0]
    assert ex.ids.tolist() == [i for s in segs["segments"] for i in tok.encode(s["text"], add_special_tokens=False)]
    assert tok.decode(ex.ids[ex.train].tolist(), skip_special_tokens=False) == "<|im_start|>assistant\nyo<|im_end|>"


def long_chat(n_turns=6):
    msgs = [{"role": "system", "content": "S" * 20}]
    for i in range(n_turns):
        msgs += [{"role": "user", "content": f"question {i} " * 4}, {"role": "assistant", "content": f"answer {i}"}]
    return msgs


@pytest.mark.parametrize("how", ["auto", "keep-start", "keep-end", "drop"])
def test_truncation_modes(tok_dir, how):
    tok = M.load_tokenizer(tok_dir)
    msgs = long_chat()
    full = data.encode_record(tok, "chat", msgs, 8192)[0]
    n = 120
    exs = data.encode_record(tok, "chat", msgs, n, truncation=how)
    if how == "drop":
        assert exs == []
        return
    (ex,) = exs
    assert len(ex.ids) == n and ex.truncated
    text = tok.decode(ex.ids.tolist(), skip_special_tokens=False)
    if how == "keep-start":
        assert np.array_equal(ex.ids, full.ids[:n]) and "answer 5" not in text
    else:  # the final answer kept whole (auto: it fits, so the prompt is what is shortened)
        assert np.array_equal(ex.ids, full.ids[-n:]) and np.array_equal(ex.train, full.train[-n:])
        assert text.endswith("answer 5<|im_end|>\n")


def test_system_flag_only_for_chats_without_one(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
                 + "\n" + json.dumps(RECORDS["per_turn_weights"]) + "\n")
    recs = [p for _, _, p in data.read_records([f], opts=data.ReadOptions(system="You are Nano."))]
    assert recs[0][0] == {"role": "system", "content": "You are Nano."} and recs[1][0]["content"] == "Be exact."
    assert recs[1].untrained == chat("per_turn_weights").untrained
