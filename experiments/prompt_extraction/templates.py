"""Task templates wrapped around each region's geo-text.

ToPT guides the frozen MLLM with one template per prediction task (section
2.2.3 of the ToPT paper; its Fig. 1 shows the crime one) and ablates them
with a task-free prompt ("w/o Task-relevant Prompt", Table 1). The texts
below are this project's own wording. The authors' task prompts are in their
inference scripts (townSeven/Prompt4RE @ 7d764a62, ``inference_llama.py`` and
``inference_qwen.py``, variable ``task_prompt``) and are not copied here; they
are longer and sit elsewhere: appended after the chat-formatted user message
and its assistant header, outside the user turn, with an empty string for no
task. Here ``{region_text}`` is replaced by the region's geo-text (centroid,
address, POI composition) inside the user turn; the images come before the
text in the message.

Any change to a text must come with a new ``TEMPLATE_VERSION``: the sha256 of
the exact text is written into every output manifest, so vectors made with
different wording can never be mixed up silently.
"""

from __future__ import annotations

from jaxurban.prompts import text_sha256

__all__ = ["TASKS", "TEMPLATE_VERSION", "TEMPLATES", "render", "template_sha256"]

TEMPLATE_VERSION = "jaxurban-prompts-1"

PLACEHOLDER = "{region_text}"

TEMPLATES: dict[str, str] = {
  "crime": (
    "You are shown one urban region: a satellite view, photographs taken on its streets, "
    "and a description of where it is and which places of interest it contains.\n"
    "{region_text}\n"
    "Task: judge how much crime this region is likely to see. Consider how busy its streets "
    "are, the kind and condition of its buildings, lighting and visibility, vacant lots, "
    "nightlife, shops and transit stops, and how residential or commercial it is."
  ),
  "checkIn": (
    "You are shown one urban region: a satellite view, photographs taken on its streets, "
    "and a description of where it is and which places of interest it contains.\n"
    "{region_text}\n"
    "Task: judge how many visits people are likely to record at places in this region. "
    "Consider restaurants, bars, shops, offices, venues, parks, landmarks and transit hubs, "
    "how attractive and accessible it is, and how many visitors it draws from elsewhere."
  ),
  "serviceCall": (
    "You are shown one urban region: a satellite view, photographs taken on its streets, "
    "and a description of where it is and which places of interest it contains.\n"
    "{region_text}\n"
    "Task: judge how many requests for city services (such as potholes, broken street "
    "lights, graffiti, rubbish or abandoned vehicles) residents are likely to file here. "
    "Consider housing density, the state of roads, pavements and buildings, and traffic."
  ),
  # No task: the same framing without any task instruction, for the
  # ablation that removes the task-relevant prompt.
  "none": (
    "You are shown one urban region: a satellite view, photographs taken on its streets, "
    "and a description of where it is and which places of interest it contains.\n"
    "{region_text}"
  ),
}

TASKS = tuple(TEMPLATES)


def _check_task(task: str) -> str:
  if task not in TEMPLATES:
    raise ValueError(f"unknown task {task!r}; templates exist for {', '.join(TASKS)}")
  return TEMPLATES[task]


def template_sha256(task: str) -> str:
  """sha256 of the exact template text of ``task`` (as stored in manifests)."""
  return text_sha256(_check_task(task))


def render(task: str, region_text: str) -> str:
  """The text part of one region's prompt: the template with its geo-text."""
  # str.replace rather than str.format: geo-text may contain braces.
  return _check_task(task).replace(PLACEHOLDER, region_text.strip())
