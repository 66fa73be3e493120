import pytest

from sdft_utils.data.prompts import (
    AUTHORS_TEMPLATE,
    build_teacher_messages,
    check_teacher_template,
    load_teacher_template,
    to_messages,
    tokenize_chat_prompts,
)
from sdft_utils.errors import UserInputError


def test_authors_template_is_the_papers_string():
    assert AUTHORS_TEMPLATE == (
        "\n{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
        "Now answer with a response of your own, including the thinking process.\n"
    )


def test_teacher_messages_with_authors_template():
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    teacher = build_teacher_messages(prompt, "2+2 = 4.", AUTHORS_TEMPLATE)
    assert teacher == [
        {
            "role": "user",
            "content": "\nWhat is 2+2?\n\nThis is an example for a response to the question:\n2+2 = 4.\n\n"
            "Now answer with a response of your own, including the thinking process.\n",
        }
    ]
    assert prompt == [{"role": "user", "content": "What is 2+2?"}]  # input not mutated


def test_teacher_messages_keep_system_and_earlier_turns():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Sum {a} and 1?"},  # braces in the content are not placeholders
    ]
    original = [dict(message) for message in prompt]
    teacher = build_teacher_messages(prompt, "It is {a}+1", "Q: {prompt}\nExample: {demonstration}")
    assert teacher[:3] == original[:3]
    assert teacher[3] == {"role": "user", "content": "Q: Sum {a} and 1?\nExample: It is {a}+1"}
    assert prompt == original
    assert all(new is not old for new, old in zip(teacher, prompt, strict=True))


def test_teacher_messages_need_a_user_turn():
    with pytest.raises(ValueError, match="no user turn"):
        build_teacher_messages([{"role": "system", "content": "x"}], "d", AUTHORS_TEMPLATE)


def test_to_messages():
    assert to_messages("hi") == [{"role": "user", "content": "hi"}]
    assert to_messages([{"role": "user", "content": "hi", "name": None}]) == [{"role": "user", "content": "hi"}]


def test_load_teacher_template_default_string_and_file(tmp_path):
    assert load_teacher_template(None) == AUTHORS_TEMPLATE
    # A shell argument carries backslash-n as two characters.
    assert load_teacher_template("{prompt}\\n\\nExample: {demonstration}") == "{prompt}\n\nExample: {demonstration}"
    path = tmp_path / "template.txt"
    path.write_text("Task:\n{prompt}\nSee {{this}}: {demonstration}\\n", encoding="utf-8")
    # A file is used verbatim: no backslash-n conversion.
    assert load_teacher_template(str(path)) == "Task:\n{prompt}\nSee {{this}}: {demonstration}\\n"


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{prompt} only", "{demonstration} appears 0 times"),
        ("{prompt} {prompt} {demonstration}", "{prompt} appears 2 times"),
        ("{prompt} {demonstration} {answer}", "unknown placeholders {answer}"),
        ("{prompt} {demonstration} {}", "unknown placeholders {}"),
        ("{prompt!r} {demonstration}", "unknown placeholders {prompt!r}"),
        ("{prompt} {demonstration} }", "cannot be parsed"),
        ("$prompt and $demonstration", "not string.Template's $name"),
    ],
)
def test_template_validation(template, expected):
    with pytest.raises(UserInputError) as error:
        load_teacher_template(template)
    message = str(error.value)
    assert expected in message
    assert "{{ and }}" in message and "--teacher_template" in message


def test_template_validation_names_missing_file_and_bad_file(tmp_path):
    with pytest.raises(UserInputError, match="no file has that name"):
        load_teacher_template("templates/teacher.txt")
    path = tmp_path / "bad.txt"
    path.write_text("{prompt}", encoding="utf-8")
    with pytest.raises(UserInputError, match=f"teacher template file {path}: {{demonstration}} appears 0 times"):
        load_teacher_template(str(path))
    assert check_teacher_template(AUTHORS_TEMPLATE) is AUTHORS_TEMPLATE


def test_tokenize_untruncated_matches_chat_template(tokenizer):
    conversations = [
        [{"role": "user", "content": "hello"}],
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "a longer question"}],
    ]
    ids, truncated = tokenize_chat_prompts(tokenizer, conversations, max_length=1000)
    assert truncated == 0
    for conversation, token_ids in zip(conversations, ids, strict=True):
        expected = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        assert token_ids == list(expected)
        assert tokenizer.decode(token_ids).endswith("<|im_start|>assistant\n")


def test_tokenize_truncates_from_the_left(tokenizer):
    short = [{"role": "user", "content": "hi"}]
    long = [{"role": "user", "content": "x" * 50 + "END"}]
    full_ids, _ = tokenize_chat_prompts(tokenizer, [short, long], max_length=1000)
    ids, truncated = tokenize_chat_prompts(tokenizer, [short, long], max_length=25)
    assert truncated == 1
    assert ids[0] == full_ids[0]
    assert len(ids[1]) == 25 and ids[1] == full_ids[1][-25:]
    assert tokenizer.decode(ids[1]).endswith("END<|im_end|>\n<|im_start|>assistant\n")
    assert tokenize_chat_prompts(tokenizer, [], max_length=5) == ([], 0)
    with pytest.raises(ValueError):
        tokenize_chat_prompts(tokenizer, [short], max_length=0)
