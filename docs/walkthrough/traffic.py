"""Send sixteen everyday questions through the gateway and print the served version."""

from openai import OpenAI

QUESTIONS = [
    "How do I boil an egg?",
    "What is the capital of Australia?",
    "Give me three tips for a job interview.",
    "Explain what a black hole is in two sentences.",
    "Write a haiku about autumn rain.",
    "How many minutes are in a day?",
    "What does HTTP stand for?",
    "Suggest a name for a grey cat.",
    "Why is the sky blue?",
    "How do I say thank you in Spanish?",
    "What is a prime number?",
    "Recommend a short book for a long flight.",
    "How can I fall asleep faster?",
    "What is the difference between weather and climate?",
    "Write one sentence that uses the word 'serendipity'.",
    "How do I make my houseplants grow better?",
]

client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="walkthrough")
for question in QUESTIONS:
    reply = client.chat.completions.with_raw_response.create(
        model="gemma-3-270m",
        messages=[{"role": "user", "content": question}],
        max_tokens=80,
    )
    version = reply.headers.get("x-drpo-prompt-version")
    answer = (reply.parse().choices[0].message.content or "").strip()
    print(f"[{version}] {question} -> {answer[:60].replace(chr(10), ' ')}")
