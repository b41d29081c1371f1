"""The lmms-eval model `mgpt4` end to end through the real CLI (`python -m lmms_eval --model mgpt4`) on local
tasks in lmms-eval's task schema, written here: a yes/no task scored as POPE scores, a caption task scored
with lmms-eval's COCO metrics, a multiple-choice task through `loglikelihood`. The expected answers and
scores come from mgpt4's own `generate` / LLM on the same images with prompts written out by hand: the
generation tasks check the decoding (until, max_new_tokens, batching) and the scoring, the multiple-choice
task the prompt and the image (the tiny model's log-probabilities move with both; its greedy replies
hardly do). Then `python -m mgpt4.eval bench` on two processes (same answers as one, scores in the run's
TensorBoard and metrics.json) and the bad inputs."""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import datasets  # lmms-eval's datasets library: the tasks' data as its load_from_disk reads it
import numpy as np
import pytest
import torch

from mgpt4.data.synthetic import _scene, draw, short_caption
from mgpt4.eval.scores import score_captions
from mgpt4.images import eval_transform
from mgpt4.model.prompts import VICUNA_V0_SYSTEM
from tests.chat_fixtures import readable_tiny_model, write_checkpoint
from tests.curate_fixtures import one_torch_thread
from tests.launch import REPO

N_YES_NO, N_CAPTIONS, N_CHOICE = 6, 4, 4
YES_NO_TOKENS, CAPTION_TOKENS = 8, 12
POST_PROMPT = "\nAnswer the question using a single word or phrase."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
CHOICES = ["red circle", "green square", "yellow triangle"]
RESULTS = re.compile(r"\d{8}_\d{6}_results\.json")  # lmms-eval's, not a task's submission file

# The tasks: the keys and the `!function` hooks of lmms-eval's own pope.yaml and coco2014_cap_val.yaml,
# their scoring functions imported from lmms-eval; the data read offline with load_from_disk.
YES_NO_YAML = f"""\
dataset_path: {{data}}/yes_no
dataset_kwargs:
  load_from_disk: true
task: tiny_pope
test_split: test
output_type: generate_until
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: !function utils.pope_doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {YES_NO_TOKENS}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
process_results: !function utils.yes_no_results
metric_list:
  - metric: pope_accuracy
    aggregation: !function utils.pope_aggregate_accuracy
    higher_is_better: true
  - metric: pope_f1_score
    aggregation: !function utils.pope_aggregate_f1_score
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {json.dumps(POST_PROMPT)}
metadata:
  - version: 0.0
"""

CAPTION_YAML = f"""\
dataset_path: {{data}}/captions
dataset_kwargs:
  load_from_disk: true
task: tiny_coco_cap
test_split: val
output_type: generate_until
doc_to_visual: !function utils.coco_doc_to_visual
doc_to_text: "{CAPTION_PROMPT}"
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {CAPTION_TOKENS}
  temperature: 0
  top_p: 1.0
  num_beams: 1
  do_sample: false
  until: ["."]
process_results: !function utils.coco_process_result
metric_list:
""" + "".join(
    f"""  - metric: coco_{m}
    aggregation: !function utils.coco_{a}
    higher_is_better: true
"""
    for m, a in (
        ("Bleu_4", "bleu4"),
        ("Bleu_1", "bleu1"),
        ("METEOR", "meteor"),
        ("ROUGE_L", "rougel"),
        ("CIDEr", "cider"),
    )
)

CHOICE_YAML = """\
dataset_path: {data}/choice
dataset_kwargs:
  load_from_disk: true
task: tiny_choice
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.pope_doc_to_visual
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

MISSING_YAML = YES_NO_YAML.replace("{data}/yes_no", "{data}/not_prepared").replace(
    "tiny_pope", "tiny_missing"
)

UTILS = '''\
from lmms_eval.tasks.coco_cap.utils import (  # noqa: F401
    coco_bleu1, coco_bleu4, coco_cider, coco_doc_to_visual, coco_meteor, coco_process_result, coco_rougel,
)
from lmms_eval.tasks.pope.utils import (  # noqa: F401
    pope_aggregate_accuracy, pope_aggregate_f1_score, pope_doc_to_text, pope_doc_to_visual, pope_process_results,
)


def yes_no(reply):
    """The official POPE evaluation's reading of a free answer: "no" when its first sentence says no or not."""
    words = reply.split(".")[0].replace(",", "").lower().split()
    return "no" if ("no" in words or "not" in words) else "yes"


def yes_no_results(doc, results):
    return pope_process_results(doc, [yes_no(results[0])])
'''


def official_yes_no(reply: str) -> str:
    words = reply.split(".")[0].replace(",", "").lower().split()
    return "no" if ("no" in words or "not" in words) else "yes"


def vicuna_prompt(question: str) -> str:
    """The Vicuna v0 conversation with one image and one question, written out (official conversation.py)."""
    return f"{VICUNA_V0_SYSTEM}###Human: <Img><ImageHere></Img> {question}###Assistant: "


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A tiny run, the three datasets saved as lmms-eval's offline tasks read them, the task folder, and the
    environment in which `python -m lmms_eval` finds the model `mgpt4` through this checkout's entry point."""
    root = tmp_path_factory.mktemp("lmms")
    model = readable_tiny_model(tokenizer)
    run = write_checkpoint(model, str(root / "ckpt"))
    rng = np.random.default_rng(0)
    scenes = [_scene(rng) for _ in range(N_YES_NO)]
    images = [draw(s, 80, 64, rng) for s in scenes]
    image = datasets.Image()
    references = [[short_caption(scenes[i]), f"a picture number {i}"] for i in range(N_CAPTIONS)]
    data = root / "data"
    datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict(
                {
                    "question_id": [str(i) for i in range(N_YES_NO)],
                    "image": images,
                    "question": [f"Is there a {CHOICES[i % 3]} in the image?" for i in range(N_YES_NO)],
                    "answer": ["yes" if i % 2 else "no" for i in range(N_YES_NO)],
                }
            ).cast_column("image", image)
        }
    ).save_to_disk(str(data / "yes_no"))
    datasets.DatasetDict(
        {
            "val": datasets.Dataset.from_dict(
                {
                    "question_id": [f"COCO_val2014_{100 + i:012d}.jpg" for i in range(N_CAPTIONS)],
                    "id": list(range(N_CAPTIONS)),
                    "image": images[:N_CAPTIONS],
                    "answer": references,
                }
            ).cast_column("image", image)
        }
    ).save_to_disk(str(data / "captions"))
    datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_dict(
                {
                    "image": images[:N_CHOICE],
                    "question": ["What is in the picture?"] * N_CHOICE,
                    "choices": [CHOICES] * N_CHOICE,
                    "answer": [i % 3 for i in range(N_CHOICE)],
                }
            ).cast_column("image", image)
        }
    ).save_to_disk(str(data / "choice"))
    tasks = root / "tasks"
    tasks.mkdir()
    for name, text in (
        ("yes_no", YES_NO_YAML),
        ("caption", CAPTION_YAML),
        ("choice", CHOICE_YAML),
        ("missing", MISSING_YAML),
    ):
        (tasks / f"{name}.yaml").write_text(text.replace("{data}", str(data)))
    (tasks / "utils.py").write_text(UTILS)
    # The entry point as `pip install` declares it: this checkout's setup.py, metadata written aside.
    meta = root / "meta"
    meta.mkdir()
    subprocess.run(
        [sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(meta)],
        cwd=REPO, check=True, capture_output=True,
    )  # fmt: skip
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(meta), REPO, env.get("PYTHONPATH", "")])
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1"
    )
    env["HF_HOME"] = str(root / "hf_home")  # nothing cached from elsewhere
    return {"root": root, "run": run, "tasks": str(tasks), "env": env, "images": images, "model": model,
            "references": references}  # fmt: skip


def lmms_eval(world, out, *args, processes: int = 1) -> subprocess.CompletedProcess:
    cmd = [
        "-m",
        "lmms_eval",
        "--model",
        "mgpt4",
        "--include_path",
        world["tasks"],
        "--output_path",
        str(out),
        *args,
    ]
    if processes > 1:
        from tests.launch import free_port

        cmd = ["-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *cmd]  # fmt: skip
    return subprocess.run(
        [sys.executable, *cmd],
        env=world["env"],
        cwd=str(world["root"]),
        capture_output=True,
        text=True,
        timeout=900,
    )


def samples(out, task: str) -> dict[int, dict]:
    [path] = glob.glob(os.path.join(out, "**", f"*_samples_{task}.jsonl"), recursive=True)
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return {r["doc_id"]: r for r in rows}


def results(out) -> dict:
    [path] = [
        p
        for p in glob.glob(os.path.join(out, "**", "*_results.json"), recursive=True)
        if RESULTS.fullmatch(os.path.basename(p))
    ]
    with open(path, encoding="utf-8") as f:
        return json.load(f)["results"]


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    done = lmms_eval(
        world, out, "--model_args", f"checkpoint={world['run']},device=cpu",
        "--tasks", "tiny_pope,tiny_coco_cap,tiny_choice", "--batch_size", "2", "--log_samples",
    )  # fmt: skip
    # lmms-eval logs an error inside the evaluation and still exits 0: the results file says it ran.
    assert done.returncode == 0 and glob.glob(os.path.join(out, "*_results.json")), (
        done.stdout[-3000:] + done.stderr[-3000:]
    )
    return out


def expected_replies(world, questions: list[str], max_new_tokens: int, until: str | None = None) -> list[str]:
    """mgpt4's own `generate`, one image at a time, on the hand-written Vicuna v0 prompt."""
    model, size = world["model"], world["model"].cfg.vision.image_size
    replies = []
    for img, question in zip(world["images"], questions):
        [reply] = model.generate(
            eval_transform(img, size)[None], vicuna_prompt(question), max_new_tokens=max_new_tokens
        )
        replies.append(reply.split(until)[0] if until else reply)
    return replies


@pytest.mark.slow
def test_yes_no_task_answers_and_scores_as_mgpt4_generates(world, one_process):
    questions = [f"Is there a {CHOICES[i % 3]} in the image?{POST_PROMPT}" for i in range(N_YES_NO)]
    want = expected_replies(world, questions, YES_NO_TOKENS)
    got = samples(one_process, "tiny_pope")
    assert [got[i]["filtered_resps"] for i in range(N_YES_NO)] == want
    assert all(want), "the tiny model answers something"
    truth = ["yes" if i % 2 else "no" for i in range(N_YES_NO)]
    pred = [official_yes_no(r) for r in want]
    tp = sum(p == t == "yes" for p, t in zip(pred, truth))
    precision = tp / max(1, sum(p == "yes" for p in pred))
    recall = tp / sum(t == "yes" for t in truth)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    scores = results(one_process)["tiny_pope"]
    assert scores["pope_accuracy,none"] == pytest.approx(np.mean([p == t for p, t in zip(pred, truth)]))
    assert scores["pope_f1_score,none"] == pytest.approx(f1)


@pytest.mark.slow
def test_caption_task_scores_with_coco_metrics_as_mgpt4_generates(world, one_process):
    want = expected_replies(world, [CAPTION_PROMPT] * N_CAPTIONS, CAPTION_TOKENS, until=".")
    got = samples(one_process, "tiny_coco_cap")
    assert [got[i]["filtered_resps"] for i in range(N_CAPTIONS)] == want
    refs = {str(i): world["references"][i] for i in range(N_CAPTIONS)}
    expected = score_captions({str(i): want[i] for i in range(N_CAPTIONS)}, refs)
    scores = results(one_process)["tiny_coco_cap"]
    for ours, theirs in (
        ("BLEU-4", "Bleu_4"),
        ("BLEU-1", "Bleu_1"),
        ("METEOR", "METEOR"),
        ("ROUGE-L", "ROUGE_L"),
        ("CIDEr", "CIDEr"),
    ):
        assert scores[f"coco_{theirs},none"] == pytest.approx(expected[ours], abs=1e-6), theirs


@torch.no_grad()
def direct_logprob(model, img, question: str, answer: str) -> float:
    """log p(answer | image, question) from the LLM's logits on the spliced embeddings."""
    ctx = model.context_embeds(
        vicuna_prompt(question), [model.encode_img(eval_transform(img, model.cfg.vision.image_size)[None])]
    )
    ids = torch.tensor(model.tokenizer(answer, add_special_tokens=False)["input_ids"])
    inputs = torch.cat([ctx, model.llm.get_input_embeddings()(ids)[None]], dim=1)
    logprobs = model.llm(inputs_embeds=inputs).logits[0].float().log_softmax(-1)
    n = ctx.shape[1]
    return float(sum(logprobs[n - 1 + k, t] for k, t in enumerate(ids.tolist())))


@pytest.mark.slow
def test_multiple_choice_task_scores_log_probabilities_computed_directly(world, one_process):
    """The tiny random model's greedy replies hardly depend on the image or the question (the tasks above
    check decoding); its log-probabilities do, so this test is the one that tells a wrong prompt or image
    apart: the tolerance is well below what another image or prompt changes (checked here)."""
    got = samples(one_process, "tiny_choice")
    tol = 1e-5
    hits, wanted = [], []
    for i in range(N_CHOICE):
        want = [
            direct_logprob(world["model"], world["images"][i], "What is in the picture?", c) for c in CHOICES
        ]
        # -log p, as lmms-eval's multiple-choice scoring (argmin) reads it; logged as strings.
        logged = [float(r[0]) for r in got[i]["filtered_resps"]]
        assert logged == pytest.approx([-w for w in want], abs=tol)
        hits.append(int(np.argmax(want)) == i % 3)
        wanted.append(want)
    assert results(one_process)["tiny_choice"]["acc,none"] == pytest.approx(np.mean(hits))
    # Another image, or the question without the template's system text, moves them far beyond `tol`.
    assert min(abs(a[0] - b[0]) for j, a in enumerate(wanted) for b in wanted[j + 1 :]) > 10 * tol
    model, img = world["model"], world["images"][0]
    ids = torch.tensor(model.tokenizer(CHOICES[0], add_special_tokens=False)["input_ids"])
    bare = model.context_embeds(
        "###Human: <Img><ImageHere></Img> What is in the picture?###Assistant: ",
        [model.encode_img(eval_transform(img, model.cfg.vision.image_size)[None])],
    )
    with torch.no_grad():
        logits = model.llm(
            inputs_embeds=torch.cat([bare, model.llm.get_input_embeddings()(ids)[None]], 1)
        ).logits
    logprobs = logits[0].float().log_softmax(-1)
    other = float(sum(logprobs[bare.shape[1] - 1 + k, t] for k, t in enumerate(ids.tolist())))
    assert abs(other - wanted[0][0]) > 10 * tol


@pytest.mark.slow
@pytest.mark.multirank
def test_bench_on_two_processes_answers_as_one_and_writes_the_run_scores(world, one_process, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    done = subprocess.run(
        [sys.executable, "-m", "mgpt4.eval", "bench", "--checkpoint", world["run"], "--tasks", "tiny_pope,tiny_choice",
         "--include-path", world["tasks"], "--device", "cpu", "--batch-size", "2", "--num-processes", "2"],
        env=world["env"], cwd=str(world["root"]), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = os.path.join(world["run"], "bench", "step_00000010")
    for task in ("tiny_pope", "tiny_choice"):
        one, two = samples(one_process, task), samples(os.path.join(out, "lmms_eval"), task)
        assert sorted(two) == sorted(one)
        for doc in one:
            if task == "tiny_choice":  # (log-probability, is greedy) per choice
                two_ll = [float(r[0]) for r in two[doc]["filtered_resps"]]
                assert two_ll == pytest.approx([float(r[0]) for r in one[doc]["filtered_resps"]], abs=1e-5)
            else:
                assert two[doc]["filtered_resps"] == one[doc]["filtered_resps"]
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as f:
        metrics = json.load(f)
    single = results(one_process)
    assert metrics["step"] == 10 and metrics["checkpoint"].endswith("step_00000010")
    assert metrics["scores"]["tiny_pope"]["pope_accuracy"] == pytest.approx(
        single["tiny_pope"]["pope_accuracy,none"]
    )
    assert metrics["scores"]["tiny_choice"]["acc"] == pytest.approx(single["tiny_choice"]["acc,none"])
    events = EventAccumulator(os.path.join(world["run"], "tensorboard")).Reload()
    [acc] = events.Scalars("bench/tiny_pope/pope_accuracy")
    assert (acc.step, acc.value) == (10, pytest.approx(metrics["scores"]["tiny_pope"]["pope_accuracy"]))
    assert "bench/tiny_choice/acc" in events.Tags()["scalars"]


@pytest.mark.slow
def test_unknown_model_args_key_is_one_line(world, tmp_path):
    done = lmms_eval(
        world, tmp_path, "--model_args", f"checkpoint={world['run']},colour=red", "--tasks", "tiny_pope"
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "--model_args: unknown key(s) colour; mgpt4 takes checkpoint, dtype, batch_size, preset, eva_vit, blip2, "
        "blip2_hf, llm, proj, allow_random_weights, device, llm_8bit, vision_device"
    )


def test_checkpoint_folder_without_a_complete_checkpoint_is_one_line(tmp_path, capsys):
    from mgpt4.eval.__main__ import main
    from mgpt4.eval.lmms_model import MiniGPT4Eval

    empty = tmp_path / "run"
    (empty / "checkpoints" / "step_00000005").mkdir(parents=True)  # a save cut short: no projection
    with pytest.raises(SystemExit) as e:
        MiniGPT4Eval.create_from_arg_string(f"checkpoint={empty},device=cpu")
    assert str(e.value) == (
        f"--model_args checkpoint={empty}: no complete mgpt4 checkpoint there (a run folder, its checkpoints/ "
        "folder or one step_N folder holding config.json and llama_proj.pth)"
    )
    assert main(["bench", "--checkpoint", str(empty), "--tasks", "pope"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --checkpoint {empty}: no complete mgpt4 checkpoint there")


@pytest.mark.parametrize("args, message", [
    ("batch_size=auto", "batch_size 'auto': mgpt4 takes a whole number of requests per batch (no 'auto')"),
    ("dtype=fp64", "--model_args dtype=fp64: expected one of fp32, bf16, fp16"),
])  # fmt: skip
def test_bad_model_args_values_are_one_line(world, args, message):
    from mgpt4.eval.lmms_model import MiniGPT4Eval

    with pytest.raises(SystemExit) as e:
        MiniGPT4Eval.create_from_arg_string(f"checkpoint={world['run']},{args}")
    assert str(e.value) == message


@pytest.mark.slow
def test_task_whose_local_data_is_missing_is_one_line(world, capsys):
    from mgpt4.eval.__main__ import main

    code = main(
        ["bench", "--checkpoint", world["run"], "--tasks", "tiny_missing", "--include-path", world["tasks"]]
    )
    assert code == 1
    [line] = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("error:")]
    data = os.path.join(world["root"], "data", "not_prepared")
    assert line == (
        f"error: task tiny_missing ({os.path.join(world['tasks'], 'missing.yaml')}): its data dataset_path: {data} "
        "(load_from_disk) is not there; prepare it as the README's 'Evaluate on benchmarks' shows, or fix "
        "dataset_path / data_files"
    )


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, tokenizer):
    """The lmms-eval model built as lmms-eval builds it, in this process, on a tiny checkpoint."""
    from mgpt4.eval.lmms_model import MiniGPT4Eval

    run = write_checkpoint(readable_tiny_model(tokenizer), str(tmp_path_factory.mktemp("inproc")))
    return MiniGPT4Eval.create_from_arg_string(f"checkpoint={run},device=cpu", {"batch_size": "3"})


def test_prompts_are_the_official_chat_conversation_for_one_several_or_no_images(in_process):
    turn = "###Human: <Img><ImageHere></Img>"
    assert in_process.prompt("  What is it?\n", 1) == vicuna_prompt("What is it?")
    # Several images: one turn each, the question joined to the last, as the official chat uploads them.
    assert in_process.prompt("Same?", 2) == f"{VICUNA_V0_SYSTEM}{turn}{turn} Same?###Assistant: "
    assert in_process.prompt("Hello?", 0) == f"{VICUNA_V0_SYSTEM}###Human: Hello?###Assistant: "


def test_generate_until_batches_mixed_requests_and_answers_each_as_generate_would(in_process):
    """Requests with 0, 1 and 2 images and two decoding settings, batched by 3: each answer is the one
    mgpt4's `generate` gives that request alone, in the requests' order."""
    from lmms_eval.api.instance import Instance

    model = in_process.model
    size = model.cfg.vision.image_size
    rng = np.random.default_rng(1)
    images = [draw(_scene(rng), 64, 64, rng) for _ in range(4)]
    docs = [
        {"images": [images[0]], "q": "What is it?"},
        {"images": [], "q": "Say something."},
        {"images": [images[1], images[2]], "q": "Same?"},
        {"images": [images[3]], "q": "Colours?"},
        {"images": [images[2]], "q": "Shapes?"},
    ]
    in_process.task_dict = {"t": {"test": docs}}
    kwargs = [{"max_new_tokens": 6, "until": ["\n\n"]}, {"max_new_tokens": 3, "until": "in"}]
    requests = [
        Instance(
            "generate_until",
            (d["q"], dict(kwargs[i % 2]), lambda d: d["images"], i, "t", "test"),
            idx=0,
            metadata={"task": "t", "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]
    got = in_process.generate_until(requests)
    for i, d in enumerate(docs):
        n = len(d["images"])
        prompt = f"{VICUNA_V0_SYSTEM}" + "###Human: <Img><ImageHere></Img>" * n
        prompt += (" " if n else "###Human: ") + f"{d['q']}###Assistant: "
        pixels = [eval_transform(im, size)[None] for im in d["images"]]
        [reply] = model.generate_from_embeds(
            [model.encode_img(p) for p in pixels], prompt, max_new_tokens=kwargs[i % 2]["max_new_tokens"]
        )
        until = kwargs[i % 2]["until"]
        assert got[i] == reply.split(until if isinstance(until, str) else until[0])[0], i


def test_unknown_generation_settings_are_named_once_and_sampling_is_honoured(in_process, caplog):
    settings, until = in_process._settings(
        {"do_sample": True, "temperature": 0.7, "top_p": 0.5, "until": "."}, "t"
    )
    assert (settings.do_sample, settings.temperature, settings.top_p, until) == (True, 0.7, 0.5, ["."])
    with caplog.at_level("WARNING"):
        in_process._settings({"image_aspect_ratio": "pad"}, "t2")
        in_process._settings({"image_aspect_ratio": "pad"}, "t2")
    named = [r.getMessage() for r in caplog.records if "image_aspect_ratio" in r.getMessage()]
    assert named == [
        "task t2: generation_kwargs image_aspect_ratio are not settings of mgpt4's decoding; they are not applied"
    ]
