"""Tasks for evaluation and RL: the built-in tools and the tool-call format, shared by every stage.

Why a package of its own: the server, the evaluation suite, agentic RL and the demo must run the
same tools and read the same call format; task generators and reward checkers will live here too.
"""

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

__all__ = [
    "BUILTIN_TOOLS",
    "WEATHER",
    "ParsedReply",
    "Tool",
    "ToolCall",
    "ToolError",
    "calculate_math",
    "call_tool",
    "date_add",
    "format_number",
    "format_tool_call",
    "get_current_time",
    "get_current_weather",
    "lookup",
    "parse_reply",
    "parse_tool_calls",
    "safe_calculate",
    "split_reasoning",
    "tool_result_text",
    "tool_schemas",
    "unit_converter",
]
