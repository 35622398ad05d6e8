"""A fixed set of short chat prompts for greedy-agreement checks (every serving path
against HF transformers): general knowledge, instructions, arithmetic, code, and text
from the machine's own licence files. Written for this project; no dataset download."""

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Explain in one sentence what a compiler does.",
    "Give me a synonym for 'happy'.",
    "Write a Python function that returns the square of a number.",
    "What does the GNU General Public License allow you to do with the software?",
    "Translate 'good morning' into Spanish.",
    "List the days of the week.",
    "Why is the sky blue?",
    "Summarize: free software gives users the freedom to run, study, share and modify it.",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet cat.",
    "How many legs does a spider have?",
    "What is the opposite of 'cold'?",
)
