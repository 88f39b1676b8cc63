// Passkey ceremony for the demo identity provider's pages (no dependencies).
// The page's #passkey-form carries the URLs and CSRF token in data-* attributes;
// pressing its button asks the server for options, runs navigator.credentials
// create() or get(), posts the result back and follows the "next" URL it returns.
"use strict";

(function () {
  const form = document.getElementById("passkey-form");
  if (!form) {
    return;
  }
  const button = document.getElementById("passkey-button");
  const status = document.getElementById("passkey-status");

  function toBytes(base64url) {
    const base64 = base64url.replace(/-/g, "+").replace(/_/g, "/");
    const padded = base64 + "=".repeat((4 - (base64.length % 4)) % 4);
    const binary = atob(padded);
    const bytes = new Uint8Array(binary.length);
    for (let i = 0; i < binary.length; i += 1) {
      bytes[i] = binary.charCodeAt(i);
    }
    return bytes.buffer;
  }

  function toBase64url(buffer) {
    const bytes = new Uint8Array(buffer);
    let binary = "";
    for (let i = 0; i < bytes.length; i += 1) {
      binary += String.fromCharCode(bytes[i]);
    }
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function withCredentialIds(list) {
    return (list || []).map((item) => Object.assign({}, item, { id: toBytes(item.id) }));
  }

  function creationOptions(json) {
    return Object.assign({}, json, {
      challenge: toBytes(json.challenge),
      user: Object.assign({}, json.user, { id: toBytes(json.user.id) }),
      excludeCredentials: withCredentialIds(json.excludeCredentials),
    });
  }

  function requestOptions(json) {
    return Object.assign({}, json, {
      challenge: toBytes(json.challenge),
      allowCredentials: withCredentialIds(json.allowCredentials),
    });
  }

  function credentialJSON(credential) {
    const response = credential.response;
    const out = {
      id: credential.id,
      rawId: toBase64url(credential.rawId),
      type: credential.type,
      authenticatorAttachment: credential.authenticatorAttachment || null,
      clientExtensionResults: credential.getClientExtensionResults(),
      response: { clientDataJSON: toBase64url(response.clientDataJSON) },
    };
    if (response.attestationObject) {
      out.response.attestationObject = toBase64url(response.attestationObject);
      out.response.transports = response.getTransports ? response.getTransports() : [];
    } else {
      out.response.authenticatorData = toBase64url(response.authenticatorData);
      out.response.signature = toBase64url(response.signature);
      out.response.userHandle = response.userHandle ? toBase64url(response.userHandle) : null;
    }
    return out;
  }

  async function post(url, body) {
    const reply = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: {
        "Content-Type": "application/json",
        "X-CSRF-Token": form.dataset.csrfToken,
      },
      body: JSON.stringify(body),
    });
    const data = await reply.json().catch(() => ({}));
    if (!reply.ok) {
      throw new Error(data.error || "the server said no (" + reply.status + ")");
    }
    return data;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!window.PublicKeyCredential) {
      status.textContent = "This browser does not support passkeys.";
      return;
    }
    button.disabled = true;
    status.textContent = "Waiting for your passkey...";
    try {
      const options = await post(form.dataset.optionsUrl, {});
      const credential =
        form.dataset.ceremony === "create"
          ? await navigator.credentials.create({ publicKey: creationOptions(options) })
          : await navigator.credentials.get({ publicKey: requestOptions(options) });
      const result = await post(form.dataset.verifyUrl, { credential: credentialJSON(credential) });
      status.textContent = "Done, continuing...";
      window.location.assign(result.next);
    } catch (error) {
      status.textContent = "That did not work: " + error.message + ". You can try again.";
      button.disabled = false;
    }
  });
})();
