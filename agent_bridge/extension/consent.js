// The vibe agent's consent window: one page's request (origin as the browser named it,
// the scopes in words, the name the page gave as its own claim). Only the person, on this
// extension page, can answer it; no web page can reach or frame it.

const $ = (id) => document.getElementById(id);
const id = location.hash.slice(1);

async function ask(type, fields = {}) {
  const answer = await chrome.runtime.sendMessage({ type, ...fields });
  if (!answer) throw new Error("The vibe agent did not answer.");
  if (answer.error) throw Object.assign(new Error(answer.error.message), { code: answer.error.code });
  return answer.result;
}

function fail(error) {
  const p = document.createElement("p");
  p.className = "message error";
  p.role = "alert";
  p.textContent = error.message;
  $("messages").replaceChildren(p);
}

// Keep the service worker awake while the person reads (it holds the request).
const port = chrome.runtime.connect({ name: "consent" });
setInterval(() => port.postMessage("ping"), 20_000);

// Allow answers only a person who has seen this window: it is off until the window has been
// visible and focused for ARM_DELAY, and off again whenever it is hidden or loses focus (a page
// cannot have a keystroke or a click meant for it land here: keyjacking, clickjacking).
// Nothing is focused at first, so Enter or Space pressed as the window opens does nothing, and
// a held key (its repeats) or a key pressed before the window opened never counts.
const ARM_DELAY = 750;
let armTimer = null;
let decided = false;

function disarm() {
  clearTimeout(armTimer);
  armTimer = null;
  $("allow").disabled = true;
}

function rearm() {
  disarm();
  if (decided || $("request").hidden) return;
  if (document.visibilityState !== "visible" || !document.hasFocus()) return;
  armTimer = setTimeout(() => {
    armTimer = null;
    if (!decided && document.visibilityState === "visible" && document.hasFocus()) $("allow").disabled = false;
  }, ARM_DELAY);
}

window.addEventListener("focus", rearm);
window.addEventListener("blur", disarm);
document.addEventListener("visibilitychange", rearm);

const keysDown = new Set();
window.addEventListener(
  "keydown",
  (event) => {
    if (event.repeat) {
      event.preventDefault();
      event.stopImmediatePropagation();
      return;
    }
    keysDown.add(event.code);
  },
  true,
);
window.addEventListener(
  "keyup",
  (event) => {
    // A key whose press this window did not see (held from the page) does not click here.
    if (!keysDown.delete(event.code)) {
      event.preventDefault();
      event.stopImmediatePropagation();
    }
  },
  true,
);

async function decide(decision) {
  if (decided) return;
  if (decision === "allow" && $("allow").disabled) return;
  decided = true;
  disarm();
  $("deny").disabled = $("block").disabled = true;
  try {
    await ask("decide", { id, decision });
    window.close();
  } catch (error) {
    decided = false;
    $("deny").disabled = $("block").disabled = false;
    rearm();
    fail(error);
  }
}

try {
  const request = await ask("consent", { id });
  $("origin").textContent = request.origin;
  $("name").textContent = request.name ? `It calls itself “${request.name}”; only the address above is checked.` : "";
  $("email").textContent = request.identity.email;
  $("server").textContent = request.identity.server;
  $("scopes").replaceChildren(
    ...request.scopes.map(([sentence, collection]) => {
      const li = document.createElement("li");
      li.textContent = sentence;
      if (collection) {
        const strong = document.createElement("strong");
        strong.textContent = ` ${collection}`;
        li.append(strong);
      }
      return li;
    }),
  );
  $("request").hidden = false;
  $("allow").addEventListener("click", () => decide("allow"));
  $("deny").addEventListener("click", () => decide("deny"));
  $("block").addEventListener("click", () => decide("block"));
  rearm();
} catch (error) {
  fail(error);
}
