//! Fill-in-the-middle prompt templates, one per model family, chosen from
//! the vocabulary (the FIM tokens a model was trained with are in it) and,
//! failing that, the model's name.

use kiln_runtime::tokenizer::Tokenizer;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FimTemplate {
    /// `<PRE> {prefix} <SUF>{suffix} <MID>` (CodeLlama).
    CodeLlama,
    /// `<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>` (Qwen2.5-Coder).
    Qwen,
    /// `<｜fim▁begin｜>{prefix}<｜fim▁hole｜>{suffix}<｜fim▁end｜>` (DeepSeek-Coder).
    DeepSeek,
    /// `<fim_prefix>{prefix}<fim_suffix>{suffix}<fim_middle>` (StarCoder, StarCoder2).
    StarCoder,
    /// No fill-in-the-middle: the prefix alone.
    None,
}

const DEEPSEEK: [&str; 3] = ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"];
const QWEN: [&str; 3] = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"];
const STARCODER: [&str; 3] = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"];

impl FimTemplate {
    pub const ALL: [FimTemplate; 5] = [
        FimTemplate::CodeLlama,
        FimTemplate::Qwen,
        FimTemplate::DeepSeek,
        FimTemplate::StarCoder,
        FimTemplate::None,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FimTemplate::CodeLlama => "codellama",
            FimTemplate::Qwen => "qwen",
            FimTemplate::DeepSeek => "deepseek",
            FimTemplate::StarCoder => "starcoder",
            FimTemplate::None => "none",
        }
    }

    pub fn parse(s: &str) -> Result<FimTemplate, String> {
        FimTemplate::ALL
            .into_iter()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = FimTemplate::ALL.iter().map(|t| t.name()).collect();
                format!(
                    "unknown FIM template {s:?}; choose one of {}",
                    names.join(", ")
                )
            })
    }

    /// The template whose special tokens the vocabulary has; else one
    /// guessed from the model's name; else none.
    pub fn detect(tok: &Tokenizer, model_name: &str) -> FimTemplate {
        let has_all = |t: &[&str]| t.iter().all(|s| tok.token_id(s).is_some());
        if has_all(&QWEN) {
            return FimTemplate::Qwen;
        }
        if has_all(&DEEPSEEK) {
            return FimTemplate::DeepSeek;
        }
        if has_all(&STARCODER) {
            return FimTemplate::StarCoder;
        }
        if has_all(&["▁<PRE>", "▁<SUF>", "▁<MID>"]) || has_all(&["<PRE>", "<SUF>", "<MID>"]) {
            return FimTemplate::CodeLlama;
        }
        let name = model_name.to_ascii_lowercase();
        if name.contains("codellama") || name.contains("code-llama") {
            FimTemplate::CodeLlama
        } else if name.contains("qwen") && name.contains("coder") {
            FimTemplate::Qwen
        } else if name.contains("deepseek") && name.contains("coder") {
            FimTemplate::DeepSeek
        } else if name.contains("starcoder") {
            FimTemplate::StarCoder
        } else {
            FimTemplate::None
        }
    }

    /// The prompt text. `context` (snippets from other files) goes before
    /// the prefix, inside the template.
    pub fn build(self, context: &str, prefix: &str, suffix: &str) -> String {
        match self {
            FimTemplate::CodeLlama => format!("<PRE> {context}{prefix} <SUF>{suffix} <MID>"),
            FimTemplate::Qwen => {
                format!("{}{context}{prefix}{}{suffix}{}", QWEN[0], QWEN[1], QWEN[2])
            }
            FimTemplate::DeepSeek => format!(
                "{}{context}{prefix}{}{suffix}{}",
                DEEPSEEK[0], DEEPSEEK[1], DEEPSEEK[2]
            ),
            FimTemplate::StarCoder => format!(
                "{}{context}{prefix}{}{suffix}{}",
                STARCODER[0], STARCODER[1], STARCODER[2]
            ),
            FimTemplate::None => format!("{context}{prefix}"),
        }
    }

    /// The suffix-prefix-middle order of the same tokens, for training
    /// (the variant of Bavarian et al. 2022 that families trained on both
    /// orders use: the prefix right before the middle, so the two read as
    /// one text); `None` without fill-in-the-middle.
    pub fn build_spm(self, prefix: &str, suffix: &str) -> Option<String> {
        let [pre, suf, mid] = match self {
            FimTemplate::CodeLlama => return Some(format!("<PRE> <SUF>{suffix} <MID> {prefix}")),
            FimTemplate::Qwen => QWEN,
            FimTemplate::DeepSeek => DEEPSEEK,
            FimTemplate::StarCoder => STARCODER,
            FimTemplate::None => return None,
        };
        Some(format!("{pre}{suf}{suffix}{mid}{prefix}"))
    }

    /// Text that ends a completion in this family besides end-of-generation.
    pub fn stop_strings(self) -> &'static [&'static str] {
        match self {
            FimTemplate::CodeLlama => &["<EOT>", " <EOT>"],
            FimTemplate::Qwen => &["<|endoftext|>", "<|fim_pad|>", "<|file_sep|>", "<|im_end|>"],
            FimTemplate::DeepSeek => &["<｜end▁of▁sentence｜>", "<|EOT|>"],
            FimTemplate::StarCoder => &["<|endoftext|>", "<file_sep>"],
            FimTemplate::None => &[],
        }
    }

    /// Whether the suffix takes part in the prompt.
    pub fn uses_suffix(self) -> bool {
        self != FimTemplate::None
    }
}

/// Repository-level prompts, for the families trained on them: the
/// repository's name, then each context snippet as a file of its own
/// after the family's file separator (its path, then its text), then the
/// file being edited around the fill-in-the-middle tokens. Other families
/// get the snippets as text after a comment naming their path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RepoFormat {
    /// Qwen2.5-Coder: `<|repo_name|>{repo}\n<|file_sep|>{path}\n{text}\n…
    /// <|file_sep|>{file}\n<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>`.
    Qwen,
    /// StarCoder2: `<repo_name>{repo}<file_sep>{path}\n{text}\n…
    /// <file_sep><fim_prefix>{file}\n{prefix}<fim_suffix>{suffix}<fim_middle>`.
    StarCoder2,
}

const QWEN_REPO: [&str; 2] = ["<|repo_name|>", "<|file_sep|>"];
const STARCODER2_REPO: [&str; 2] = ["<repo_name>", "<file_sep>"];

impl RepoFormat {
    /// The format of `fim`'s family when the vocabulary has its tokens.
    pub fn detect(tok: &Tokenizer, fim: FimTemplate) -> Option<RepoFormat> {
        let has_all = |t: &[&str]| t.iter().all(|s| tok.token_id(s).is_some());
        match fim {
            FimTemplate::Qwen if has_all(&QWEN_REPO) => Some(RepoFormat::Qwen),
            FimTemplate::StarCoder if has_all(&STARCODER2_REPO) => Some(RepoFormat::StarCoder2),
            _ => None,
        }
    }

    fn separator(self) -> &'static str {
        match self {
            RepoFormat::Qwen => QWEN_REPO[1],
            RepoFormat::StarCoder2 => STARCODER2_REPO[1],
        }
    }

    /// One context snippet from the file at `path`.
    pub fn snippet(self, path: &str, text: &str) -> String {
        format!("{}{path}\n{text}\n", self.separator())
    }

    /// The prompt: repository `repo`, the snippets `context` (made by
    /// [`RepoFormat::snippet`]), and the edited file `path` around the
    /// cursor.
    pub fn build(
        self,
        repo: &str,
        path: &str,
        context: &str,
        prefix: &str,
        suffix: &str,
    ) -> String {
        match self {
            RepoFormat::Qwen => format!(
                "{}{repo}\n{context}{}{path}\n{}{prefix}{}{suffix}{}",
                QWEN_REPO[0], QWEN_REPO[1], QWEN[0], QWEN[1], QWEN[2]
            ),
            RepoFormat::StarCoder2 => format!(
                "{}{repo}{context}{}{}{path}\n{prefix}{}{suffix}{}",
                STARCODER2_REPO[0], STARCODER2_REPO[1], STARCODER[0], STARCODER[1], STARCODER[2]
            ),
        }
    }
}

/// The line-comment marker for a file path's language.
pub fn comment_marker(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map_or("", |(_, e)| e);
    match ext {
        "py" | "sh" | "bash" | "rb" | "toml" | "yaml" | "yml" | "pl" | "r" | "jl" | "nix"
        | "cmake" | "mk" | "ex" | "exs" => "#",
        "lua" | "sql" | "hs" | "elm" | "ada" => "--",
        "lisp" | "clj" | "scm" | "el" => ";;",
        "m" | "tex" | "erl" => "%",
        "vim" => "\"",
        _ => "//",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The repository-level layouts of Qwen2.5-Coder's and StarCoder2's
    /// model cards and papers.
    #[test]
    fn repository_level_prompts_follow_each_familys_layout() {
        let q = RepoFormat::Qwen;
        let ctx = q.snippet("src/a.rs", "fn a() {}");
        assert_eq!(ctx, "<|file_sep|>src/a.rs\nfn a() {}\n");
        assert_eq!(
            q.build("proj", "src/b.rs", &ctx, "fn b() {", "}"),
            "<|repo_name|>proj\n<|file_sep|>src/a.rs\nfn a() {}\n<|file_sep|>src/b.rs\n\
             <|fim_prefix|>fn b() {<|fim_suffix|>}<|fim_middle|>"
        );
        let s = RepoFormat::StarCoder2;
        let ctx = s.snippet("a.py", "x = 1");
        assert_eq!(
            s.build("proj", "b.py", &ctx, "y = ", "\n"),
            "<repo_name>proj<file_sep>a.py\nx = 1\n<file_sep><fim_prefix>b.py\n\
             y = <fim_suffix>\n<fim_middle>"
        );
    }

    #[test]
    fn templates_place_prefix_suffix_and_context() {
        assert_eq!(
            FimTemplate::Qwen.build("// a.rs\nx\n", "fn f() {", "}"),
            "<|fim_prefix|>// a.rs\nx\nfn f() {<|fim_suffix|>}<|fim_middle|>"
        );
        assert_eq!(
            FimTemplate::CodeLlama.build("", "def f(", ")"),
            "<PRE> def f( <SUF>) <MID>"
        );
        assert_eq!(
            FimTemplate::DeepSeek.build("", "a", "b"),
            "<｜fim▁begin｜>a<｜fim▁hole｜>b<｜fim▁end｜>"
        );
        assert_eq!(
            FimTemplate::StarCoder.build("", "a", "b"),
            "<fim_prefix>a<fim_suffix>b<fim_middle>"
        );
        assert_eq!(FimTemplate::None.build("c\n", "a", "b"), "c\na");
        for t in FimTemplate::ALL {
            assert_eq!(FimTemplate::parse(t.name()), Ok(t));
        }
        assert!(FimTemplate::parse("jinja").unwrap_err().contains("qwen"));
        assert_eq!(comment_marker("src/x.py"), "#");
        assert_eq!(comment_marker("src/x.rs"), "//");
    }
}
