import pytest

from sip.augment.prompts import PromptBuilder, PromptConfig, mentions
from sip.config import ConfigError, from_dict


def test_label_inserted_when_caption_does_not_mention_it():
    build = PromptBuilder(PromptConfig())
    assert build("sneaker", "a white shoe on a table") == "a photo of a sneaker, a white shoe on a table"


def test_label_not_repeated_when_caption_mentions_it():
    build = PromptBuilder(PromptConfig())
    assert build("cat", "a tabby cat on a sofa.") == "a photo of a tabby cat on a sofa"


def test_readable_names_and_synonyms_rotate_by_variant():
    cfg = PromptConfig(label_names={"T-shirt/top": "t-shirt"}, synonyms={"T-shirt/top": ["tee"]})
    build = PromptBuilder(cfg)
    assert build("T-shirt/top", "a jersey") == "a photo of a t-shirt, a jersey"
    assert build("T-shirt/top", "a jersey", variant=1) == "a photo of a tee, a jersey"
    assert build("T-shirt/top", "a jersey", variant=2) == "a photo of a t-shirt, a jersey"
    # a caption that names the raw label or a synonym counts as mentioning it
    assert build("T-shirt/top", "a grey tee") == "a photo of a grey tee"


def test_no_caption_gives_the_label_prompt_for_txt2img():
    build = PromptBuilder(PromptConfig(label_names={"Ankle boot": "ankle boot"}))
    assert build("Ankle boot") == "a photo of a ankle boot"
    assert build("Ankle boot", "   ") == "a photo of a ankle boot"


def test_long_caption_is_cut_but_never_the_label():
    build = PromptBuilder(PromptConfig(max_tokens=12))
    caption = " ".join(f"word{i}" for i in range(40))
    prompt = build("golden retriever", caption)
    assert prompt.startswith("a photo of a golden retriever, word0 word1")
    assert len(prompt.split()) + 2 <= 12
    assert "word39" not in prompt


def test_cut_removing_the_mention_falls_back_to_inserting_the_label():
    build = PromptBuilder(PromptConfig(max_tokens=10))
    caption = "a very long description of many things and finally a cat"
    prompt = build("cat", caption)
    assert "cat" in prompt
    assert len(prompt.split()) + 2 <= 10


def test_real_tokenizer_budget(tmp_path):
    from sip.models.diffusion import offline_clip_tokenizer

    tok = offline_clip_tokenizer(tmp_path / "tok", num_merges=500, model_max_length=16)
    build = PromptBuilder.for_tokenizer(PromptConfig(max_tokens=16), tok)
    prompt = build("sneaker", "an extraordinarily unusual gastronomical photograph of something " * 5)
    assert len(tok(prompt)["input_ids"]) <= 16
    assert "sneaker" in prompt


def test_deterministic():
    build = PromptBuilder(PromptConfig(synonyms={"a": ["b", "c"]}))
    assert [build("a", "x", v) for v in range(6)] == [build("a", "x", v) for v in range(6)]


def test_mentions_is_word_based():
    assert mentions("A Golden Retriever running", "golden retriever")
    assert not mentions("a caterpillar", "cat")


@pytest.mark.parametrize("bad", [{"template": "a photo of {caption}"}, {"template": "{label} {caption} {oops}"},
                                 {"template_no_caption": "a photo"}, {"max_tokens": 2}])
def test_bad_templates_are_config_errors(bad):
    with pytest.raises(ConfigError):
        from_dict(PromptConfig, bad, source="recipe.yaml")


def test_prompt_parts_for_the_sip_ablation():
    label_only = PromptBuilder(PromptConfig(parts="label"))
    caption_only = PromptBuilder(PromptConfig(parts="caption"))
    both = PromptBuilder(PromptConfig())
    assert label_only("Coat", "a trench coat, a poncho") == "a photo of a Coat"
    assert caption_only("Coat", "a poncho, a cardigan") == "a photo of a poncho, a cardigan"
    assert both("Coat", "a poncho, a cardigan") == "a photo of a Coat, a poncho, a cardigan"
    assert caption_only("Coat", "") == "a photo of a Coat"  # no caption: the label is all there is
    with pytest.raises(ValueError, match="prompt.parts"):
        PromptConfig(parts="caption+label")
