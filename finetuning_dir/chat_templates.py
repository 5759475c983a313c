"""Chat templates marked for TRL's assistant_only_loss, for the models TRL ships none for.

`fine_tune.py --assistant-only-loss` trains on the assistant's words only: TRL renders each chat with a
template whose assistant turns sit inside `{% generation %}` markers, and the tokens outside them get no
loss. TRL brings such twins of Phi-3's and Phi-3.5's templates (trl/chat_templates/phi3*_training.jinja) and
swaps them in itself; Phi-4-mini-instruct's is here, written the same way. A marked template must render
exactly what the model's own renders (tests/test_phi4.py checks it token for token); the markers only say
which tokens are the assistant's: its answer and the `<|end|>` that ends it, and the end-of-text token after
a chat's last answer, so that the model learns to stop.
"""

# Phi-4-mini-instruct's chat template, verbatim (its tokenizer_config.json).
PHI4_MINI = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is "
    "not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' "
    "+ '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

PHI4_MINI_TRAINING = """\
{%- for message in messages %}
    {%- if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}
        {{- '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|assistant|>' }}
        {%- generation %}
        {{- message['content'] + '<|end|>' }}
        {%- endgeneration %}
    {%- else %}
        {{- '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|assistant|>' }}
{%- elif messages[-1]['role'] == 'assistant' %}
    {%- generation %}
    {{- eos_token }}
    {%- endgeneration %}
{%- else %}
    {{- eos_token }}
{%- endif %}"""

TRAINING = {PHI4_MINI: PHI4_MINI_TRAINING}


def training_template(chat_template: str | None) -> str | None:
    """The marked twin of a model's own template, or None where TRL has its own (Phi-3, Phi-3.5)."""
    return TRAINING.get(chat_template)
