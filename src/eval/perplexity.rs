//! Token-weighted perplexity: `exp(-sum(log p) / number of tokens)` over a whole corpus, so long
//! sequences count for more than short ones (not a mean of per-sequence perplexities).

/// Accumulates summed log-probabilities and token counts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Perplexity {
    pub sum_logprob: f64,
    pub tokens: usize,
}

impl Perplexity {
    pub fn add(&mut self, sum_logprob: f64, tokens: usize) {
        self.sum_logprob += sum_logprob;
        self.tokens += tokens;
    }

    /// Mean negative log-likelihood per token (nats).
    pub fn nll(&self) -> f64 {
        if self.tokens == 0 {
            return f64::NAN;
        }
        -self.sum_logprob / self.tokens as f64
    }

    pub fn value(&self) -> f64 {
        self.nll().exp()
    }
}
