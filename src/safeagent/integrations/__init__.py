"""Thin adapters between SafeAgent and agent SDKs, one module per SDK.

- :mod:`safeagent.integrations.openai`: OpenAI Chat Completions ``tool_calls`` and
  Responses API ``function_call`` items (``pip install -e '.[openai]'``).
- :mod:`safeagent.integrations.anthropic`: Anthropic Messages API ``tool_use`` blocks
  (``pip install -e '.[anthropic]'``).
- :mod:`safeagent.integrations.openai_agents`: OpenAI Agents SDK ``function_tool`` tools
  (``pip install -e '.[openai-agents]'``).

Import the module you need; ``import safeagent`` never imports any of them, and this
package imports nothing.
"""
