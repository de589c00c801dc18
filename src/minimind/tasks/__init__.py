"""Tasks for training, evaluation and RL: tools, the tool-call format, task generators and rewards.

Why a package of its own: the server, the evaluation suite, agentic RL and the demo must run the
same tools, read the same call format, draw the same seeded tasks and grade them the same way, so
all of that lives here and nothing in it depends on the demo:

* :mod:`minimind.tasks.tools` / :mod:`minimind.tasks.toolcalls`: the sandboxed built-in tools and
  the ``<tool_call>`` / reasoning parser;
* :mod:`minimind.tasks.toolset`: the three tools the generated tool tasks offer, with the lenient
  :func:`execute_tool` their graders use;
* :mod:`minimind.tasks.generators`: the seeded, bilingual task generators;
* :mod:`minimind.tasks.rows`: the tasks as rows (SFT with or without reasoning, agent-RL,
  pretraining facts);
* :mod:`minimind.tasks.checks`: answer checkers and the same checks as RL rewards
  ``(prompt, completion, **fields) -> float``;
* :mod:`minimind.tasks.sources`: the offline knowledge sources of the idiom and dictionary kinds
  (optional ``demo`` packages, found without importing them).
"""

from minimind.tasks.checks import (
    CHECKERS,
    REWARDS,
    RewardFn,
    check_answer,
    check_format,
    check_tool_call,
    extract_numbers,
    format_reward,
    reward_fn,
    task_reward,
    tool_call_reward,
)
from minimind.tasks.generators import (
    EVAL_FRACTION,
    GENERATORS,
    KINDS,
    LEVELS,
    Task,
    available_kinds,
    dictionary_answer,
    dictionary_pool,
    generate_tasks,
    idiom_answer,
    idiom_pool,
    split_of,
)
from minimind.tasks.rows import task_fact_text, task_to_rl_row, task_to_sft_row
from minimind.tasks.toolcalls import (
    ParsedReply,
    ToolCall,
    format_tool_call,
    parse_reply,
    parse_tool_calls,
    split_reasoning,
)
from minimind.tasks.tools import (
    BUILTIN_TOOLS,
    WEATHER,
    Tool,
    ToolError,
    calculate_math,
    call_tool,
    date_add,
    format_number,
    get_current_time,
    get_current_weather,
    lookup,
    safe_calculate,
    tool_result_text,
    tool_schemas,
    unit_converter,
)
from minimind.tasks.toolset import TOOL_NAMES, execute_tool, tool_result_value

__all__ = [
    "BUILTIN_TOOLS",
    "CHECKERS",
    "EVAL_FRACTION",
    "GENERATORS",
    "KINDS",
    "LEVELS",
    "REWARDS",
    "TOOL_NAMES",
    "WEATHER",
    "ParsedReply",
    "RewardFn",
    "Task",
    "Tool",
    "ToolCall",
    "ToolError",
    "available_kinds",
    "calculate_math",
    "call_tool",
    "check_answer",
    "check_format",
    "check_tool_call",
    "date_add",
    "dictionary_answer",
    "dictionary_pool",
    "execute_tool",
    "extract_numbers",
    "format_number",
    "format_reward",
    "format_tool_call",
    "generate_tasks",
    "get_current_time",
    "get_current_weather",
    "idiom_answer",
    "idiom_pool",
    "lookup",
    "parse_reply",
    "parse_tool_calls",
    "reward_fn",
    "safe_calculate",
    "split_of",
    "split_reasoning",
    "task_fact_text",
    "task_reward",
    "task_to_rl_row",
    "task_to_sft_row",
    "tool_call_reward",
    "tool_result_text",
    "tool_result_value",
    "tool_schemas",
    "unit_converter",
]
